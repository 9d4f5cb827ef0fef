"""Named method presets: a method name expands into loss specs for ``build_objective`` and an optional
post-hoc calibrator.

``resolve_method("calibprompt", alpha=0.05, lambda_as=0.01)`` ->
``MethodSpec(losses=[{"name": "LS", "weight": 1.0, "alpha": 0.05}, {"name": "SMAC", ...}, {"name": "AS",
"weight": 0.01}], posthoc=None, trains=True, ...)``. Appending ``+ts`` (``+vs``, ``+hb``, ``+iso``) to
any name adds that post-hoc calibrator, e.g. ``"coop-ce+ts"``.

The paper's per-(backbone, dataset) CalibPrompt hyper-parameters (method.md §5) are ``PAPER_HPARAMS``.
They were chosen on the test split (Q13): use them to reproduce the paper, tune on validation data for
new work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .losses import get_loss
from .losses.registry import DEFAULT_WEIGHTS

#: post-hoc calibrators a method name may carry as a "+suffix" (names of calibprompt.calibrators)
POSTHOC_SUFFIXES = ("ts", "vs", "hb", "iso")


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: what to train (``losses``) and what to apply afterwards (``posthoc``).

    ``needs_zero_shot``: the run must compute the frozen zero-shot predictions (hand-written template):
    zero-shot logits (``zeroshot``, ZS-Norm, Penalty) or zero-shot text features (KgCoOp, moment matching).
    """

    name: str
    losses: list[dict[str, Any]]
    posthoc: str | None
    trains: bool
    needs_zero_shot: bool
    description: str
    params: dict[str, Any] = field(default_factory=dict)


def _term(name: str, weight: float | None = None, **params: Any) -> dict[str, Any]:
    """A loss spec with its weight spelled out (registry default when not given)."""
    return {"name": name, "weight": float(DEFAULT_WEIGHTS[name] if weight is None else weight), **params}


@dataclass(frozen=True)
class _Preset:
    formula: str  # with the parameter symbols, e.g. "LS(alpha) + SMAC(alpha) + lambda_as * AS"
    params: dict[str, Any]  # name -> default
    build: Callable[..., list[dict[str, Any]]]
    note: str = ""


_A, _G, _L = {"alpha": 0.1}, {"gamma": 3.0}, {"lambda_as": 1.0}

PRESETS: dict[str, _Preset] = {
    "zeroshot": _Preset("no training: frozen backbone with the dataset's hand-written template", {}, lambda: []),
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
        note="In class-balanced batches SMAC does not depend on alpha (Q6); alpha then acts through LS only.",
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
}


def _split_posthoc(name: str) -> tuple[str, str | None]:
    base, sep, suffix = name.partition("+")
    if not sep:
        return base, None
    if suffix not in POSTHOC_SUFFIXES:
        raise ValueError(
            f"method {name!r}: unknown post-hoc suffix '+{suffix}'; valid suffixes: "
            f"{', '.join('+' + s for s in POSTHOC_SUFFIXES)}"
        )
    return base, suffix


def resolve_method(name: str, **params: Any) -> MethodSpec:
    """Expand a method preset (optionally with a "+ts"/"+vs"/"+hb"/"+iso" suffix) into a MethodSpec.

    Unknown methods, unknown parameters and invalid values raise ValueError naming the valid ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"a method name must be a string, got {name!r}")
    key = name.strip().lower()
    base, posthoc = _split_posthoc(key)
    if base not in PRESETS:
        raise ValueError(
            f"unknown method {name!r}; valid methods: {', '.join(PRESETS)} "
            f"(each may end in {', '.join('+' + s for s in POSTHOC_SUFFIXES)})"
        )
    preset = PRESETS[base]
    unknown = sorted(set(params) - set(preset.params))
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in preset.params.items()) or "none"
        raise ValueError(f"method '{base}' has no parameter {', '.join(map(repr, unknown))}; valid parameters: {valid}")
    resolved = {**preset.params, **params}
    for k, default in preset.params.items():
        # weights are plain numbers; the losses validate their own parameters below
        if k.startswith("lambda_") and (
            isinstance(resolved[k], bool) or not isinstance(resolved[k], (int, float)) or resolved[k] < 0
        ):
            raise ValueError(f"method '{base}': {k}={resolved[k]!r} is invalid; it must be a number >= 0 (default {default})")
    losses = preset.build(**resolved)
    needs: set[str] = set()
    for spec in losses:
        try:
            loss = get_loss(spec["name"], **{k: v for k, v in spec.items() if k not in ("name", "weight")})
        except ValueError as err:
            raise ValueError(f"method '{base}' with {resolved}: {err}") from None
        needs |= loss.needs
    values = ", ".join(f"{k}={v!r}" for k, v in resolved.items())
    description = f"{preset.formula}" + (f"  [{values}]" if values else "")
    if preset.note:
        description += f". {preset.note}"
    if posthoc:
        description += f"; then post-hoc '{posthoc}' fitted on validation logits"
    return MethodSpec(
        name=base + (f"+{posthoc}" if posthoc else ""),
        losses=losses,
        posthoc=posthoc,
        trains=bool(losses),
        needs_zero_shot=base == "zeroshot" or bool(needs & {"zs_logits", "zs_text_features"}),
        description=description,
        params=resolved,
    )


def list_methods() -> list[dict[str, Any]]:
    """One record per preset: name, description (formula), params with defaults."""
    return [
        {"name": name, "description": p.formula + (f". {p.note}" if p.note else ""), "params": dict(p.params)}
        for name, p in PRESETS.items()
    ]


# --------------------------------------------------------------------- paper hyper-parameters
#: (backbone, dataset) -> (alpha, lambda_as) of CalibPrompt in the paper (method.md §5). Chosen on the
#: test split (Q13).
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
    "POSTHOC_SUFFIXES",
    "list_methods",
    "paper_hparams",
    "paper_method",
    "resolve_method",
]
