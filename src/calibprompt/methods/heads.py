"""Classifier heads: what every method returns, a map from frozen image features to logits.

A head holds only tensors and a few numbers, so a fitted method can be evaluated, saved and shipped
without the backbone's text tower. Three kinds cover every method:

| kind          | logits z(f) for an image feature f (f̂ = f / ||f||)                  | used by                          |
|---------------|----------------------------------------------------------------------|----------------------------------|
| ``linear``    | s · f̂ · Ŵᵀ + b  (Ŵ = W with unit rows when ``normalize_weight``)     | zero-shot, CoOp family, probes   |
| ``tip``       | s · f̂ · Tᵀ + α · exp(−β (1 − f̂ · K̂ᵀ)) · L                           | Tip-Adapter, Tip-Adapter-F       |
| ``adapter``   | s · ĝ · Tᵀ with g = r · MLP(f) + (1 − r) · f                          | CLIP-Adapter                     |

Heads are saved as one safetensors file: the tensors, plus ``kind`` and the numeric settings as JSON
metadata. Loading checks the kind, every key and every shape, and never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FORMAT = "calibprompt.head/1"


class HeadError(ValueError):
    """A head file is missing, damaged or does not fit."""


class Head(nn.Module):
    """Base class: ``forward(features) -> logits`` on raw (unnormalised) image features (N, D)."""

    kind: ClassVar[str] = ""
    #: tensor name -> shape with symbolic sizes ("K" classes, "D" feature width, "M" cache size, "H" hidden)
    tensor_shapes: ClassVar[dict[str, tuple[str, ...]]] = {}

    def settings(self) -> dict[str, Any]:
        """The head's non-tensor settings (JSON-serialisable numbers and flags)."""
        return {}

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def prototypes(self) -> torch.Tensor | None:
        """L2-normalised class prototypes (K, D) that text-feature losses (AS, ...) act on, if any."""
        return None


class LinearHead(Head):
    """z = s · f̂ Ŵᵀ + b. Zero-shot and CoOp heads are W = class text features, s = logit scale, b = 0."""

    kind = "linear"
    tensor_shapes = {"weight": ("K", "D"), "bias": ("K",)}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0,
                 normalize_weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float(), requires_grad=False)
        b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().clone().float()
        self.bias = nn.Parameter(b, requires_grad=False)
        self.scale = float(scale)
        self.normalize_weight = bool(normalize_weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=-1) if self.normalize_weight else self.weight
        return self.scale * F.normalize(features.float(), dim=-1) @ w.t() + self.bias

    def settings(self) -> dict[str, Any]:
        return {"scale": self.scale, "normalize_weight": self.normalize_weight}

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)


def tip_cache_logits(features: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(−β (1 − f̂ · K̂ᵀ)) · L: Tip-Adapter's cache term before its weight α."""
    affinity = F.normalize(features.float(), dim=-1) @ F.normalize(keys, dim=-1).t()
    return torch.exp(-beta * (1.0 - affinity)) @ values


class TipAdapterHead(Head):
    """Tip-Adapter: zero-shot logits plus α times a cache model of the support features (keys K, one-hot
    values L). Cache keys are compared after L2-normalisation."""

    kind = "tip"
    tensor_shapes = {"text": ("K", "D"), "keys": ("M", "D"), "values": ("M", "K")}

    def __init__(self, text: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float,
                 scale: float):
        super().__init__()
        self.text = nn.Parameter(text.detach().clone().float(), requires_grad=False)
        self.keys = nn.Parameter(keys.detach().clone().float(), requires_grad=False)
        self.values = nn.Parameter(values.detach().clone().float(), requires_grad=False)
        self.alpha, self.beta, self.scale = float(alpha), float(beta), float(scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        clip = self.scale * F.normalize(features.float(), dim=-1) @ self.text.t()
        return clip + self.alpha * tip_cache_logits(features, self.keys, self.values, self.beta)

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "scale": self.scale}

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]


def residual_adapter(features: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ratio: float) -> torch.Tensor:
    """g = r · ReLU(ReLU(f Dᵀ) Uᵀ) + (1 − r) · f  (CLIP-Adapter's bottleneck MLP, no biases)."""
    hidden = torch.relu(features @ down.t())
    return ratio * torch.relu(hidden @ up.t()) + (1.0 - ratio) * features


class ClipAdapterHead(Head):
    """CLIP-Adapter: a residual bottleneck MLP on the image feature, then zero-shot text classification."""

    kind = "adapter"
    tensor_shapes = {"text": ("K", "D"), "down": ("H", "D"), "up": ("D", "H")}

    def __init__(self, text: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ratio: float, scale: float):
        super().__init__()
        self.text = nn.Parameter(text.detach().clone().float(), requires_grad=False)
        self.down = nn.Parameter(down.detach().clone().float(), requires_grad=False)
        self.up = nn.Parameter(up.detach().clone().float(), requires_grad=False)
        self.ratio, self.scale = float(ratio), float(scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        adapted = residual_adapter(features.float(), self.down, self.up, self.ratio)
        return self.scale * F.normalize(adapted, dim=-1) @ self.text.t()

    def settings(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "scale": self.scale}

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]


HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (LinearHead, TipAdapterHead, ClipAdapterHead)}


# ----------------------------------------------------------------------------------------- files
def head_bytes(head: Head, meta: dict[str, Any] | None = None) -> bytes:
    """The head as safetensors bytes: its tensors, with kind, settings and ``meta`` as metadata."""
    from safetensors.torch import save

    tensors = {name: getattr(head, name).detach().cpu().contiguous() for name in head.tensor_shapes}
    metadata = {"format": HEAD_FORMAT, "kind": head.kind, "settings": json.dumps(head.settings()),
                "meta": json.dumps(meta or {}, default=str)}
    return save(tensors, metadata=metadata)


def load_head(path: str | Path, num_classes: int | None = None, feature_dim: int | None = None) -> tuple[Head, dict]:
    """(head, meta) from a file written by :func:`head_bytes`. Every key and shape is checked; a wrong
    class count or feature width (when given) is an error naming both numbers."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise HeadError(f"head file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise HeadError(f"{path} is not a readable safetensors head file ({err}); re-create it") from None
    return head_from_tensors(tensors, metadata, str(path), num_classes, feature_dim)


def head_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: str,
                      num_classes: int | None = None, feature_dim: int | None = None) -> tuple[Head, dict]:
    """(head, meta) from a head's tensors and safetensors metadata, every key and shape checked; ``where``
    names the source in errors."""
    path = where
    if metadata.get("format") != HEAD_FORMAT or metadata.get("kind") not in HEADS:
        raise HeadError(f"{path}: not a calibprompt head (format {metadata.get('format')!r}, kind "
                        f"{metadata.get('kind')!r}; expected {HEAD_FORMAT!r} and one of {sorted(HEADS)})")
    cls = HEADS[metadata["kind"]]
    missing = sorted(set(cls.tensor_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(cls.tensor_shapes))
    if missing or unexpected:
        raise HeadError(f"{path}: {cls.kind} head with missing tensors {missing} / unexpected tensors {unexpected}")
    sizes: dict[str, int] = {}
    for name, symbols in cls.tensor_shapes.items():
        shape = tuple(tensors[name].shape)
        if len(shape) != len(symbols):
            raise HeadError(f"{path}: tensor {name!r} has shape {shape}; expected {len(symbols)} dimensions {symbols}")
        for symbol, size in zip(symbols, shape):
            if sizes.setdefault(symbol, size) != size:
                raise HeadError(f"{path}: tensor {name!r} has {symbol}={size} but another tensor has "
                                f"{symbol}={sizes[symbol]}; the file is inconsistent")
        if not bool(torch.isfinite(tensors[name]).all()):
            raise HeadError(f"{path}: tensor {name!r} holds NaN or infinite values")
    for symbol, expected, what in (("K", num_classes, "classes"), ("D", feature_dim, "feature width")):
        if expected is not None and symbol in sizes and sizes[symbol] != expected:
            raise HeadError(f"{path}: head has {sizes[symbol]} {what}, this task has {expected}; "
                            "use the head of a run on the same classes and backbone")
    try:
        settings = json.loads(metadata.get("settings", "{}"))
        meta = json.loads(metadata.get("meta", "{}"))
        head = cls(**tensors, **settings)
    except (TypeError, ValueError) as err:
        raise HeadError(f"{path}: settings of the {cls.kind} head are invalid ({err})") from None
    return head, meta
