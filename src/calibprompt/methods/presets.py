"""Named method presets: a name expands into a method kind, its loss list and parameters, and an
optional post-hoc calibrator.

``resolve_method("calibprompt", alpha=0.05, lambda_as=0.01)`` ->
``MethodSpec(kind="coop", losses=[{"name": "LS", "weight": 1.0, "alpha": 0.05}, {"name": "SMAC", ...},
{"name": "AS", "weight": 0.01}], posthoc=None, ...)``; ``resolve_method("linear-probe", C=1.0)`` ->
``MethodSpec(kind="linear-probe", losses=[{"name": "CE", ...}], params={"C": 1.0, ...})``. Appending
``+ts`` (or the name of any other post-hoc calibrator, ``calibprompt methods`` lists them) adds that
calibrator, fitted on the validation shots, e.g. ``"coop-ce+ts"``.

Feature-space methods take a ``losses`` parameter: any registry losses their head supports, e.g.
``{name: linear-probe, losses: [CE, {name: SMAC, alpha: 0.1}]}``.

The paper's per-(backbone, dataset) CalibPrompt hyper-parameters (docs/method.md, "hyper-parameters")
are ``PAPER_HPARAMS``. They were chosen on the test split (docs/parity.md, Q13): use them to reproduce
the paper, tune on validation data for new work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from calibprompt.losses import build_objective, get_loss
from calibprompt.losses.registry import LOSSES
from calibprompt.methods import clap, clip_adapter, coop, coop_auto, linear_probe, lp_plus_plus, promptsmooth, tip_adapter, zeroshot  # noqa: F401
from calibprompt.methods.base import METHODS, Method


def posthoc_suffixes() -> tuple[str, ...]:
    """Post-hoc calibrators a method name may carry as "+suffix" (those fitted on validation logits)."""
    from calibprompt.calibration import CALIBRATORS

    return tuple(name for name, cls in CALIBRATORS.items() if cls.as_suffix)


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: its kind (a registered :class:`Method`), what it minimises (``losses``), its
    own parameters, and what to apply afterwards (``posthoc``)."""

    name: str
    kind: str
    losses: list[dict[str, Any]]
    posthoc: str | None
    trains: bool
    description: str
    params: dict[str, Any] = field(default_factory=dict)  # the preset's parameters (alpha, lambda_as, C ...)
    method_params: dict[str, Any] = field(default_factory=dict)  # the Method's own, defaults filled in

    def build(self) -> Method:
        return METHODS[self.kind](losses=self.losses, **self.method_params)

    def as_config(self) -> dict[str, Any]:
        """The ``resolved_method`` section of a resolved run config."""
        return {"name": self.name, "kind": self.kind, "losses": self.losses, "params": self.method_params,
                "posthoc": self.posthoc, "trains": self.trains}


def _term(name: str, weight: float | None = None, **params: Any) -> dict[str, Any]:
    """A loss spec with its weight spelled out (registry default when not given)."""
    return {"name": name, "weight": float(LOSSES[name].default_weight if weight is None else weight), **params}


@dataclass(frozen=True)
class _Preset:
    formula: str  # with the parameter symbols, e.g. "LS(alpha) + SMAC(alpha) + lambda_as * AS"
    params: dict[str, Any]  # name -> default
    build: Callable[..., list[dict[str, Any]]]
    note: str = ""
    kind: str = "coop"


def _kind_preset(kind: str) -> _Preset:
    """The preset of a Method kind under its own name: its formula, CE unless ``method.losses`` says otherwise."""
    return _Preset(METHODS[kind].formula, {}, lambda: [_term("CE")], kind=kind)


_A, _G, _L = {"alpha": 0.1}, {"gamma": 3.0}, {"lambda_as": 1.0}

PRESETS: dict[str, _Preset] = {
    "zeroshot": _Preset("no training: frozen backbone with the dataset's hand-written template", {}, lambda: [],
                        kind="zeroshot"),
    "coop-ce": _Preset("CE", {}, lambda: [_term("CE")]),
    "coop-ls": _Preset("LS(alpha)", _A, lambda alpha: [_term("LS", alpha=alpha)]),
    "coop-fl": _Preset("FL(gamma)", _G, lambda gamma: [_term("FL", gamma=gamma)]),
    "coop-ce-mdca": _Preset("CE + MDCA", {}, lambda: [_term("CE"), _term("MDCA")]),
    "coop-ls-mdca": _Preset("LS(alpha) + MDCA", _A, lambda alpha: [_term("LS", alpha=alpha), _term("MDCA")]),
    "coop-fl-mdca": _Preset("FL(gamma) + MDCA", _G, lambda gamma: [_term("FL", gamma=gamma), _term("MDCA")]),
    "coop-ce-dca": _Preset("CE + 1 * DCA", {}, lambda: [_term("CE"), _term("DCA")]),
    "coop-ce-mmce": _Preset("CE + 2 * MMCE", {}, lambda: [_term("CE"), _term("MMCE")]),
    "coop-mbls": _Preset(
        "MbLS(margin, alpha) = CE + alpha * hinge(margin)",
        {"margin": 10.0, "alpha": 0.1},
        lambda margin, alpha: [_term("MBLS", margin=margin, alpha=alpha)],
    ),
    "coop-logitnorm": _Preset("LogitNorm(t)", {"t": 1.0}, lambda t: [_term("LOGITNORM", t=t)]),
    "coop-zsnorm": _Preset("ZS-Norm: CE on logits rescaled to the zero-shot range", {}, lambda: [_term("ECCV_ZS")]),
    "coop-ce-penalty": _Preset("CE + 1 * Penalty(zero-shot range)", {}, lambda: [_term("CE"), _term("ECCV_PENALTY")]),
    "coop-ce-smac": _Preset("CE + SMAC(alpha)", _A, lambda alpha: [_term("CE"), _term("SMAC", alpha=alpha)]),
    "coop-ce-smac-as": _Preset(
        "CE + SMAC(alpha) + lambda_as * AS",
        {**_A, **_L},
        lambda alpha, lambda_as: [_term("CE"), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
    ),
    "coop-fl-smac": _Preset(
        "FL(gamma) + SMAC(alpha)",
        {**_G, **_A},
        lambda gamma, alpha: [_term("FL", gamma=gamma), _term("SMAC", alpha=alpha)],
    ),
    "coop-fl-smac-as": _Preset(
        "FL(gamma) + SMAC(alpha) + lambda_as * AS",
        {**_G, **_A, **_L},
        lambda gamma, alpha, lambda_as: [_term("FL", gamma=gamma), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
    ),
    "coop-ls-smac": _Preset(
        "LS(alpha) + SMAC(alpha)",
        _A,
        lambda alpha: [_term("LS", alpha=alpha), _term("SMAC", alpha=alpha)],
    ),
    "calibprompt": _Preset(
        "LS(alpha) + SMAC(alpha) + lambda_as * AS  (one shared alpha; SMAC weight is always 1)",
        {**_A, **_L},
        lambda alpha, lambda_as: [_term("LS", alpha=alpha), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
        note="In class-balanced batches SMAC does not depend on alpha (docs/parity.md, Q6); alpha then acts through LS only.",
    ),
    "calibprompt-auto": _Preset(
        "LS(alpha) + SMAC(alpha) + lambda_as * AS, (alpha, lambda_as) chosen by cross-validation on the training shots",
        {},
        lambda: [_term("LS", alpha=0.1), _term("SMAC", alpha=0.1), _term("AS", 1.0)],
        note="No manual tuning: the grid (alphas, lambdas), folds and acc_tolerance are its parameters; it never "
             "reads the validation shots (docs/methods.md).",
        kind="coop-auto",
    ),
    "calibprompt-ce": _Preset(
        "CE + SMAC(alpha) + lambda_as * AS",
        {**_A, **_L},
        lambda alpha, lambda_as: [_term("CE"), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
    ),
    "calibprompt-fl": _Preset(
        "FL(gamma) + SMAC(alpha) + lambda_as * AS",
        {**_G, **_A, **_L},
        lambda gamma, alpha, lambda_as: [_term("FL", gamma=gamma), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
    ),
    "kgcoop": _Preset(
        "CE + lambda_kg * KgCoOp, KgCoOp = 1 - mean_k cos(t_k, t0_k)",
        {"lambda_kg": 8.0},
        lambda lambda_kg: [_term("CE"), _term("KGCOOP", lambda_kg)],
        note="lambda_kg = 8 is KgCoOp's published weight.",
    ),
    "coop-ctpt": _Preset(
        "CE + lambda_ctpt * (-ATFD)  (C-TPT dispersion as a train-time regulariser)",
        {"lambda_ctpt": 50.0},
        lambda lambda_ctpt: [_term("CE"), _term("CTPT_DISPERSION", lambda_ctpt)],
        note="lambda_ctpt = 50 is C-TPT's fine-grained test-time value (20 on ImageNet shifts).",
    ),
    "coop-otpt": _Preset(
        "CE + lambda_otpt * ||T T^T - I||_F^2  (O-TPT orthogonality as a train-time regulariser)",
        {"lambda_otpt": 2.0, "squared": True, "reduction": "sum"},
        lambda lambda_otpt, squared, reduction: [
            _term("CE"),
            _term("OTPT_ORTHO", lambda_otpt, squared=squared, reduction=reduction),
        ],
        note="lambda_otpt = 2 is the public O-TPT script's value; the variant is an explicit option.",
    ),
    "coop-ce-tmm": _Preset(
        "CE + lambda_tmm * text moment matching",
        {"lambda_tmm": 5.0},
        lambda lambda_tmm: [_term("CE"), _term("TEXT_MOMENT_MATCHING", lambda_tmm)],
    ),
    "coop-ce-mmv": _Preset("CE + margin mean-variance", {}, lambda: [_term("CE"), _term("MARGIN_MEAN_VAR")]),
    "promptsmooth": _Preset(
        "CE on Gaussian-noised views (few-shot PromptSmooth; method.sigmas, method.noise_seed)", {},
        lambda: [_term("CE")], kind="promptsmooth",
        note="Certify with `calibprompt certify`; --tta adds the test-time (zero-shot) step (docs/robustness.md)."),
    "promptsmooth-as": _Preset(
        "CE + lambda_as * AS on Gaussian-noised views (PromptSmooth + angular separation)", _L,
        lambda lambda_as: [_term("CE"), _term("AS", lambda_as)], kind="promptsmooth"),
    "promptsmooth-calibprompt": _Preset(
        "CE + SMAC(alpha) + lambda_as * AS on Gaussian-noised views", {**_A, **_L},
        lambda alpha, lambda_as: [_term("CE"), _term("SMAC", alpha=alpha), _term("AS", lambda_as)],
        kind="promptsmooth"),
    "linear-probe-smac": _Preset("linear probe on CE + SMAC(alpha)", _A,
                                 lambda alpha: [_term("CE"), _term("SMAC", alpha=alpha)], kind="linear-probe"),
}

for _kind in ("linear-probe", "zs-lp", "lp++", "clap", "tip-adapter", "tip-adapter-f", "clip-adapter"):
    PRESETS[_kind] = _kind_preset(_kind)


def _split_posthoc(name: str) -> tuple[str, str | None]:
    base, sep, suffix = name.rpartition("+")  # rightmost: "lp++" is a name, "lp+++ts" is lp++ with ts
    if name in PRESETS or not sep:
        return name, None
    valid = posthoc_suffixes()
    if suffix not in valid:
        raise ValueError(f"method {name!r}: unknown post-hoc suffix '+{suffix}'; valid suffixes: "
                         f"{', '.join('+' + s for s in valid)}")
    return base, suffix


def resolve_method(name: str, **params: Any) -> MethodSpec:
    """Expand a method preset (optionally with a post-hoc "+suffix") into a MethodSpec.

    Unknown methods, unknown parameters, losses the method's head cannot take and invalid values raise
    ValueError naming the valid ones."""
    if not isinstance(name, str):
        raise ValueError(f"a method name must be a string, got {name!r}")
    base, posthoc = _split_posthoc(name.strip().lower())
    if base not in PRESETS:
        from calibprompt.plugins import load_plugins

        load_plugins()  # a plug-in package may register the method
        if base in METHODS:  # a registered Method kind without a preset: its own name, CE by default
            PRESETS[base] = _kind_preset(base)
        base, posthoc = _split_posthoc(name.strip().lower())
    if base not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(PRESETS)} "
                         f"(each may end in {', '.join('+' + s for s in posthoc_suffixes())})")
    preset = PRESETS[base]
    cls = METHODS[preset.kind]
    takes_loss_list = cls.takes_losses and preset.kind != "coop"
    explicit_losses = params.pop("losses", None)
    own = {k: params.pop(k) for k in list(params) if k in cls.params and k not in preset.params}
    unknown = sorted(params.keys() - preset.params.keys())
    if unknown:
        valid = {**preset.params, **cls.params, **({"losses": ["CE"]} if takes_loss_list else {})}
        listed = ", ".join(f"{k} (default {v!r})" for k, v in valid.items()) or "none"
        raise ValueError(f"method '{base}' has no parameter {', '.join(map(repr, unknown))}; valid parameters: {listed}")
    resolved = {**preset.params, **params}
    for k, default in preset.params.items():
        # weights are plain numbers; the losses validate their own parameters below
        if k.startswith("lambda_") and (
            isinstance(resolved[k], bool) or not isinstance(resolved[k], (int, float)) or resolved[k] < 0
        ):
            raise ValueError(f"method '{base}': {k}={resolved[k]!r} is invalid; it must be a number >= 0 (default {default})")
    if explicit_losses is not None:
        if not takes_loss_list:
            hint = ("; for prompt learning with your own loss list use method: custom and a top-level `losses:` list"
                    if preset.kind == "coop" else "")
            raise ValueError(f"method '{base}' takes no 'losses' parameter{hint}")
        losses = normalise_losses(explicit_losses, f"method '{base}'")
    else:
        losses = preset.build(**resolved) if cls.takes_losses else []
    if losses:
        try:  # every loss, parameter and weight checked now, before any work
            objective = build_objective(losses)
        except ValueError as err:
            raise ValueError(f"method '{base}' with {resolved}: {err}") from None
        for loss in objective.losses:
            missing = set(loss.needs) - set(cls.loss_inputs)
            if missing:
                raise ValueError(f"method '{base}': loss {loss.name} needs {', '.join(sorted(missing))}, which a "
                                 f"{cls.name} head does not provide; losses on logits alone (CE, LS, FL, SMAC, MDCA, "
                                 "...) work with every trained head")
    method = cls(losses=losses, **own)
    values = ", ".join(f"{k}={v!r}" for k, v in {**resolved, **own}.items())
    description = preset.formula + (f"  [{values}]" if values else "")
    if preset.note:
        description += f". {preset.note}"
    if posthoc:
        description += f"; then post-hoc '{posthoc}' fitted on validation logits"
    return MethodSpec(name=base + (f"+{posthoc}" if posthoc else ""), kind=preset.kind, losses=losses,
                      posthoc=posthoc, trains=cls.trains, description=description, params={**resolved, **own},
                      method_params=method.hparams)


def normalise_losses(losses: Any, where: str) -> list[dict[str, Any]]:
    """A loss list as specs: names become ``{"name": NAME}``; weights default to the registry's."""
    if isinstance(losses, (str, dict)) or not isinstance(losses, (list, tuple)) or not losses:
        raise ValueError(f"{where}: losses must be a non-empty list of loss names or {{name, weight, ...}} mappings")
    out = []
    for i, item in enumerate(losses):
        spec = {"name": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else None
        if spec is None or "name" not in spec:
            raise ValueError(f"{where}: loss #{i} must be a name or a mapping with a 'name' key, got {item!r}")
        canonical = get_loss(str(spec.pop("name")), **{k: v for k, v in spec.items() if k != "weight"}).name
        weight = spec.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise ValueError(f"{where}: loss {canonical} has weight {weight!r}; a weight is a number >= 0")
        out.append(_term(canonical, spec.pop("weight", None), **spec))
    return out


def list_methods() -> list[dict[str, Any]]:
    """One record per preset: name, kind, family, description (formula), params with defaults."""
    from calibprompt.plugins import load_plugins

    load_plugins()
    for kind in METHODS:  # plug-in Method kinds without a preset of their own
        PRESETS.setdefault(kind, _kind_preset(kind))
    out = []
    for name, p in PRESETS.items():
        cls = METHODS[p.kind]
        out.append({"name": name, "kind": p.kind, "family": cls.family,
                    "description": p.formula + (f". {p.note}" if p.note else ""),
                    "params": {**p.params, **cls.params}, "reference": cls.reference})
    return out


# --------------------------------------------------------------------- paper hyper-parameters
#: (backbone, dataset) -> (alpha, lambda_as) of CalibPrompt in the paper (docs/method.md, "hyper-parameters"). Chosen on the
#: test split (docs/parity.md, Q13).
PAPER_HPARAMS: dict[tuple[str, str], tuple[float, float]] = {
    ("medclip-vit", "covid"): (0.2, 1.0),
    ("medclip-vit", "rsna18"): (0.2, 1.0),
    ("biomedclip", "covid"): (0.1, 3.0),
    ("biomedclip", "rsna18"): (0.1, 3.0),
    ("plip", "kather"): (0.05, 0.01),
    ("plip", "pannuke"): (0.2, 0.1),
    ("plip", "digestpath"): (0.03, 0.001),
    ("quiltnet-b32", "kather"): (0.01, 1.0),
    ("quiltnet-b32", "pannuke"): (0.1, 0.001),
    ("quiltnet-b32", "digestpath"): (0.05, 0.001),
}

_BACKBONE_ALIASES = {"medclip": "medclip-vit", "quiltnet": "quiltnet-b32"}
_DATASET_ALIASES = {"kathercolon": "kather"}  # the official dataset NAME


def paper_hparams(backbone: str, dataset: str) -> dict[str, float]:
    """``{"alpha": ..., "lambda_as": ...}`` of the paper for this pair (case-insensitive)."""
    b = backbone.strip().lower()
    d = dataset.strip().lower()
    b, d = _BACKBONE_ALIASES.get(b, b), _DATASET_ALIASES.get(d, d)
    if (b, d) not in PAPER_HPARAMS:
        pairs = ", ".join(f"{pb}/{pd}" for pb, pd in PAPER_HPARAMS)
        raise ValueError(f"no paper hyper-parameters for backbone {backbone!r} on dataset {dataset!r}; known pairs: {pairs}")
    alpha, lambda_as = PAPER_HPARAMS[(b, d)]
    return {"alpha": alpha, "lambda_as": lambda_as}


def paper_method(backbone: str, dataset: str) -> MethodSpec:
    """The paper's CalibPrompt configuration for (backbone, dataset)."""
    return resolve_method("calibprompt", **paper_hparams(backbone, dataset))


__all__ = [
    "MethodSpec",
    "PAPER_HPARAMS",
    "normalise_losses",
    "posthoc_suffixes",
    "list_methods",
    "paper_hparams",
    "paper_method",
    "resolve_method",
]
