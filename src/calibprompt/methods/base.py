"""The Method interface: fitted on the few-shot split, a method returns a classifier head.

Every way of adapting a frozen Med-VLM -- zero-shot prompts, CoOp prompt learning with any loss list,
linear probes and adapters on frozen features -- is a :class:`Method`. ``fit`` receives a
:class:`FitContext` (cached image features of the training shots, their labels, the zero-shot text
features, the backbone for methods that run its text tower) and returns a :class:`FitResult` whose
``head`` maps image features to logits. Run, tuning, sweep, report and the benchmark use only this.

Adding a method is one module with a subclass, decorated with :func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from calibprompt.methods.heads import Head
from calibprompt.settings import registrar


def check_labels(labels: torch.Tensor, n_classes: int, what: str = "training") -> None:
    """Labels in [0, K), checked once before any device work: the losses check labels per call only on the
    CPU (on an accelerator that check would wait for the device at every step)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"{what} labels must lie in [0, {n_classes - 1}] ({n_classes} classes), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")


@dataclass
class FitContext:
    """What a method may use to fit. Never holds test images or labels.

    ``train_views``: (N, V, D) cached features of the training shots (V augmented views, or V = 1 with
    the test transform); ``val_features``/``val_labels``: the validation shots (None without
    ``val_shots``), which methods may use for model selection as their papers do."""

    backbone: Any  # calibprompt.backbones.Backbone; only methods with ``uses_text_tower`` touch it
    classnames: list[str]
    train_views: torch.Tensor
    labels: torch.Tensor
    zs_text: torch.Tensor  # (K, D) L2-normalised features of the hand-written zero-shot prompts
    scale: float  # the backbone's frozen logit scale exp(s)
    seed: int
    device: torch.device
    train_cfg: dict = field(default_factory=dict)  # resolved ``train:`` section (prompt learners)
    prompt_cfg: dict = field(default_factory=dict)  # resolved ``prompt:`` section (prompt learners)
    val_features: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    progress: bool = False
    #: (K, D) the same zero-shot text features before L2-normalisation (CLAP's and ZS-LP's start)
    zs_text_raw: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_labels(self.labels, self.num_classes)
        if self.val_labels is not None:
            check_labels(self.val_labels, self.num_classes, "validation")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by the run seed (and ``salt`` for independent streams)."""
        return torch.Generator().manual_seed(int(self.seed) * 1000003 + salt)


@dataclass
class FitResult:
    """A fitted head plus what the run records about fitting (steps, losses, selections)."""

    head: Head
    info: dict = field(default_factory=dict)
    #: extra files for the run folder (name -> bytes), e.g. the CoOp context vectors
    files: dict[str, bytes] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement :meth:`fit`.

    ``params``: name -> default of the method's own hyper-parameters (validated at construction);
    ``losses``: the train-time objective as loss specs (``[{"name": "CE"}]`` by default)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # "zero-shot", "prompt" or "feature"
    formula: ClassVar[str] = ""
    reference: ClassVar[str] = ""  # paper and public code the recipe follows
    params: ClassVar[dict[str, Any]] = {}
    #: "augmented": training views per the ``train:`` section; "clean": test-transform features only;
    #: "noisy": augmented views with Gaussian pixel noise (``train_noise(n_views)``, PromptSmooth)
    train_views: ClassVar[str] = "augmented"
    trains: ClassVar[bool] = True
    takes_losses: ClassVar[bool] = True
    #: the head has learnable class prototypes, so text-feature losses (AS, C-TPT, ...) apply to it
    has_prototypes: ClassVar[bool] = False
    uses_text_tower: ClassVar[bool] = False
    #: optional loss inputs the method can supply (see calibprompt.losses.base.INPUT_DOCS)
    loss_inputs: ClassVar[frozenset[str]] = frozenset({"text_features", "zs_logits", "zs_text_features"})

    def __init__(self, losses: list[dict] | None = None, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            valid = ", ".join(f"{k} (default {v!r})" for k, v in self.params.items()) or "none"
            raise ValueError(f"method '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                             f"valid parameters: {valid}")
        self.hparams = {**self.params, **params}
        self.losses = list(losses) if losses is not None else ([{"name": "CE", "weight": 1.0}] if self.trains else [])
        self.validate()

    def validate(self) -> None:
        """Check ``self.hparams``; raise ValueError naming the parameter and its valid range."""

    def needs_validation(self) -> bool:
        """True when fitting cannot proceed without validation shots (e.g. a search with no default)."""
        return False

    def fit(self, ctx: FitContext) -> FitResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def objective(self):
        """The loss list as one callable objective (``calibprompt.losses.build_objective``)."""
        from calibprompt.losses import build_objective

        return build_objective(self.losses)

    # -- helpers for parameter checks --------------------------------------------------------------
    def _number(self, key: str, low: float | None = None, high: float | None = None, *, integer: bool = False,
                open_low: bool = False, allow_none: bool = False) -> None:
        value = self.hparams[key]
        if value is None and allow_none:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and integer:
            ok = float(value).is_integer()
        if ok and low is not None:
            ok = value > low if open_low else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            what = "an integer" if integer else "a number"
            bound = ""
            if low is not None:
                bound += f" {'>' if open_low else '>='} {low}"
            if high is not None:
                bound += f" and <= {high}"
            raise ValueError(f"method '{self.name}': {key}={value!r} is invalid; it must be {what}{bound}"
                             + (" or null" if allow_none else ""))


METHODS: dict[str, type[Method]] = {}
register_method = registrar(METHODS, "method")


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method kind {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name]


ProgressFn = Callable[[str], None]


def warn_if_smac_alpha_inert(losses: list[dict], labels: torch.Tensor, batch_size: int) -> None:
    """In a class-balanced batch SMAC's smoothed target is 1/K whatever alpha is (docs/parity.md, Q6),
    so alpha then acts only through LS. Say so when every batch is the whole, balanced training set."""
    import warnings

    smac = [spec for spec in losses if str(spec.get("name", "")).upper() == "SMAC" and spec.get("alpha")]
    counts = torch.bincount(labels.long())
    counts = counts[counts > 0]
    if smac and len(labels) == batch_size and bool((counts == counts[0]).all()):
        warnings.warn(
            "SMAC alpha has no effect here: every batch is the full class-balanced training set, so the "
            "smoothed batch frequency is 1/K for any alpha (docs/parity.md, Q6); alpha acts only through LS.",
            stacklevel=3,
        )
