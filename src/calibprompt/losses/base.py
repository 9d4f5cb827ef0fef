"""What every train-time loss shares: parameter validation, input checks, the call signature, repr.

A loss is built once from its parameters and then called every step as
``loss(logits, labels, text_features=None, *, zs_logits=None, zs_text_features=None)``.

* ``logits``: (N, K) float tensor of the tuned prompts; ``labels``: (N,) integer tensor.
* ``text_features``: (K, D) L2-normalised class features of the tuned prompts.
* ``zs_logits``: (N, K) frozen zero-shot logits of the same images (detached here).
* ``zs_text_features``: (K, D) frozen class features of the hand-written prompts (detached here).

A loss declares what it needs (``needs``), so the trainer computes only that, and a missing input is an
error: the official code silently skips or falls back instead (docs/parity.md, Q17), we never do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from calibprompt.settings import CONVENTIONS

#: The optional inputs a loss may need, with the text used in error messages.
INPUT_DOCS: dict[str, str] = {
    "text_features": "the L2-normalised (K, D) class features of the tuned prompts",
    "zs_logits": "the frozen zero-shot logits (N, K) of the same images (hand-written template)",
    "zs_text_features": "the frozen (K, D) class features of the hand-written zero-shot prompts",
}


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a loss: its default, type and valid range (checked at construction)."""

    name: str
    default: Any
    kind: str  # "float", "bool" or "choice"
    valid: str = ""  # human description of the valid values, used in error messages
    check: Callable[[Any], bool] | None = None
    choices: tuple[Any, ...] = ()
    allow_none: bool = False

    def validate(self, loss: str, value: Any) -> Any:
        """The value converted to its canonical type, or ValueError naming loss, parameter and range."""
        if value is None and self.allow_none:
            return None
        if self.kind == "choice":
            if isinstance(value, str):
                value = value.lower()
            if value not in self.choices:
                raise ValueError(
                    f"loss '{loss}': {self.name}={value!r} is invalid; valid choices: "
                    f"{', '.join(repr(c) for c in self.choices)}"
                    + (" (or None to follow the convention)" if self.allow_none else "")
                )
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"loss '{loss}': {self.name}={value!r} is invalid; use True or False")
            return value
        # float: reject bools (True is an int in Python) and non-finite numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"loss '{loss}': {self.name}={value!r} is invalid; it must be a finite number ({self.valid})"
            )
        value = float(value)
        if self.check is not None and not self.check(value):
            raise ValueError(f"loss '{loss}': {self.name}={value!r} is invalid; {self.name} must be {self.valid}")
        return value


def unit_interval_open(name: str = "alpha", default: float = 0.1) -> Param:
    """A smoothing value in [0, 1)."""
    return Param(name, default, "float", "in [0, 1)", lambda v: 0.0 <= v < 1.0)


def non_negative(name: str, default: float) -> Param:
    return Param(name, default, "float", ">= 0", lambda v: v >= 0.0)


def positive(name: str, default: float) -> Param:
    return Param(name, default, "float", "> 0", lambda v: v > 0.0)


@dataclass
class LossInputs:
    """The validated inputs of one call; ``num_classes`` is K."""

    logits: torch.Tensor | None
    labels: torch.Tensor | None
    text_features: torch.Tensor | None
    zs_logits: torch.Tensor | None
    zs_text_features: torch.Tensor | None
    num_classes: int


class Loss:
    """Base class. Subclasses set the class attributes and implement :meth:`compute`."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "task", "calibration" or "text"
    formula: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    uses_logits: ClassVar[bool] = True  # False for losses on text features only
    #: how the "reference" convention (the official code) departs from "standard"; "" = identical
    reference_note: ClassVar[str] = ""
    #: weight in an objective when a spec gives none: the official yaml values (docs/parity.md, Q12)
    default_weight: ClassVar[float] = 1.0

    def __init__(self, *, convention: str = "standard", **params: Any) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(
                f"loss '{self.name}': convention={convention!r} is invalid; valid choices: "
                f"{', '.join(repr(c) for c in CONVENTIONS)}"
            )
        known = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            valid = ", ".join([*known, "convention"])
            raise ValueError(
                f"loss '{self.name}' has no parameter {', '.join(repr(u) for u in unknown)}; "
                f"valid parameters: {valid}"
            )
        self.convention = convention
        self.hparams: dict[str, Any] = {}
        for p in self.params:
            self.hparams[p.name] = p.validate(self.name, params.get(p.name, p.default))

    def __getattr__(self, item: str) -> Any:
        # parameters read as attributes (loss.alpha); only called when normal lookup fails
        hparams = self.__dict__.get("hparams", {})
        if item in hparams:
            return hparams[item]
        raise AttributeError(item)

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        text_features: torch.Tensor | None = None,
        *,
        zs_logits: torch.Tensor | None = None,
        zs_text_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = self._check(logits, labels, text_features, zs_logits, zs_text_features)
        return self.compute(inputs)

    def compute(self, x: LossInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The fully resolved parameters (for run configs and logs)."""
        return {"name": self.name, **self.hparams, "convention": self.convention}

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in self.hparams.items()]
        args.append(f"convention={self.convention!r}")
        return f"{self.name}({', '.join(args)})"

    # ------------------------------------------------------------------ validation
    def _missing(self, what: str) -> ValueError:
        return ValueError(
            f"loss '{self.name}' needs {what} ({INPUT_DOCS[what]}) but got None. The official code "
            f"silently skips or falls back here (docs/parity.md, Q17); calibprompt raises instead. Compute it "
            f"in the trainer (see loss.needs = {sorted(self.needs)}) and pass {what}=..."
        )

    def _check(self, logits, labels, text_features, zs_logits, zs_text_features) -> LossInputs:
        for what, value in (
            ("text_features", text_features),
            ("zs_logits", zs_logits),
            ("zs_text_features", zs_text_features),
        ):
            if what in self.needs and value is None:
                raise self._missing(what)

        k: int | None = None
        if self.uses_logits:
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
                raise ValueError(
                    f"loss '{self.name}': logits must be a floating (N, K) torch tensor, got "
                    f"{_describe(logits)}"
                )
            n, k = logits.shape
            if n == 0:
                raise ValueError(f"loss '{self.name}': empty batch (logits of shape {tuple(logits.shape)})")
            if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
                raise ValueError(
                    f"loss '{self.name}': labels must be an integer tensor of shape ({n},), got "
                    f"{_describe(labels)}"
                )
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ValueError(f"loss '{self.name}': labels must be integers, got dtype {labels.dtype}")
            labels = labels.to(device=logits.device, dtype=torch.long)
            if labels.device.type == "cpu":  # on an accelerator this would wait for the device every step;
                lo, hi = int(labels.min()), int(labels.max())  # the trainers check the labels once, up front
                if lo < 0 or hi >= k:
                    raise ValueError(f"loss '{self.name}': labels must lie in [0, {k - 1}], got values in [{lo}, {hi}]")
            if zs_logits is not None and "zs_logits" in self.needs:
                if not isinstance(zs_logits, torch.Tensor) or zs_logits.shape != logits.shape:
                    raise ValueError(
                        f"loss '{self.name}': zs_logits must have the shape of logits {tuple(logits.shape)}, "
                        f"got {_describe(zs_logits)}"
                    )
                # frozen reference: never back-propagate into it; work in the logits' dtype
                zs_logits = zs_logits.detach().to(device=logits.device, dtype=logits.dtype)
        elif isinstance(logits, torch.Tensor) and logits.dim() == 2:
            k = logits.shape[1]  # text-only loss: logits are optional but must agree on K when given

        if "text_features" in self.needs:
            if not isinstance(text_features, torch.Tensor) or text_features.dim() != 2:
                raise ValueError(
                    f"loss '{self.name}': text_features must be a (K, D) tensor, got {_describe(text_features)}"
                )
            if k is not None and text_features.shape[0] != k:
                raise ValueError(
                    f"loss '{self.name}': text_features has {text_features.shape[0]} rows but logits have "
                    f"K={k} classes"
                )
            k = text_features.shape[0]
            if "zs_text_features" in self.needs:
                if (
                    not isinstance(zs_text_features, torch.Tensor)
                    or zs_text_features.shape != text_features.shape
                ):
                    raise ValueError(
                        f"loss '{self.name}': zs_text_features must have the shape of text_features "
                        f"{tuple(text_features.shape)}, got {_describe(zs_text_features)}"
                    )
                zs_text_features = zs_text_features.detach().to(
                    device=text_features.device, dtype=text_features.dtype
                )
        assert k is not None
        if k < 2:
            raise ValueError(f"loss '{self.name}' needs at least 2 classes, got K={k}")
        return LossInputs(logits, labels, text_features, zs_logits, zs_text_features, k)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__ if x is not None else "None"


# ---------------------------------------------------------------------- shared numerics
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax in the logits' dtype. log_softmax subtracts the row max (never log(softmax(z)))."""
    return F.log_softmax(logits, dim=-1)


def one_hot(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(labels, k).to(dtype)


def safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """sqrt(max(value, 0)) whose gradient is 0, not NaN, where value <= 0."""
    if bool(value > 0):
        return torch.sqrt(value)
    return value * 0.0


def zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that is still connected to the graph of x (so backward() works)."""
    return x.sum() * 0.0


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm. Idempotent on unit rows (and gradient-equivalent upstream)."""
    return F.normalize(t, dim=-1)
