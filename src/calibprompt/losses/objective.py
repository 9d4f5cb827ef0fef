"""A weighted sum of registry losses: L = Σ_n w_n · L_n (docs/method.md, "losses")."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Loss
from .registry import get_loss


class Objective:
    """Callable like a single loss; returns Σ w_n L_n. ``terms`` gives each term for logging.

    Terms are labelled by their canonical names; a repeated name gets a suffix ("CE", "CE#2").
    """

    def __init__(self, losses: Sequence[Loss], weights: Sequence[float]) -> None:
        if len(losses) != len(weights):
            raise ValueError("Objective: one weight per loss is needed")
        if not losses:
            raise ValueError("Objective: at least one loss is needed (a method without training has no objective)")
        self.losses = list(losses)
        self.weights = [float(w) for w in weights]
        self.labels: list[str] = []
        seen: dict[str, int] = {}
        for loss in self.losses:
            seen[loss.name] = seen.get(loss.name, 0) + 1
            self.labels.append(loss.name if seen[loss.name] == 1 else f"{loss.name}#{seen[loss.name]}")

    @property
    def needs(self) -> frozenset[str]:
        """The optional inputs some term needs ("text_features", "zs_logits", "zs_text_features")."""
        return frozenset().union(*(loss.needs for loss in self.losses))

    def terms(
        self,
        logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        text_features: torch.Tensor | None = None,
        *,
        zs_logits: torch.Tensor | None = None,
        zs_text_features: torch.Tensor | None = None,
        weighted: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Each term's value (unweighted unless ``weighted=True``), in order, keyed by label."""
        out: dict[str, torch.Tensor] = {}
        for label, loss, w in zip(self.labels, self.losses, self.weights):
            value = loss(logits, labels, text_features, zs_logits=zs_logits, zs_text_features=zs_text_features)
            out[label] = value * w if weighted else value
        return out

    def evaluate(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, unweighted terms) from one evaluation of every term."""
        kwargs.pop("weighted", None)
        terms = self.terms(*args, **kwargs)
        total = sum(w * v for w, v in zip(self.weights, terms.values()))
        return total, terms  # type: ignore[return-value]

    def __call__(
        self,
        logits: torch.Tensor | None,
        labels: torch.Tensor | None,
        text_features: torch.Tensor | None = None,
        *,
        zs_logits: torch.Tensor | None = None,
        zs_text_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.evaluate(logits, labels, text_features, zs_logits=zs_logits, zs_text_features=zs_text_features)[0]

    def specs(self) -> list[dict[str, Any]]:
        """The fully resolved specs (every parameter, weight and convention), for run records."""
        return [{**loss.spec(), "weight": w} for loss, w in zip(self.losses, self.weights)]

    def __repr__(self) -> str:
        return "Objective(" + " + ".join(f"{w:g}*{loss!r}" for loss, w in zip(self.losses, self.weights)) + ")"


def build_objective(specs: Sequence[Mapping[str, Any]], *, convention: str | None = None) -> Objective:
    """Objective from ``[{"name": ..., "weight": w, **params}, ...]``.

    A missing weight is the loss's ``default_weight``. ``convention`` applies to every spec
    that does not set its own.
    """
    if isinstance(specs, Mapping) or not isinstance(specs, Sequence):
        raise ValueError("build_objective expects a list of loss specs like [{'name': 'CE'}, {'name': 'MDCA'}]")
    losses, weights = [], []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"loss spec #{i} must be a mapping with a 'name' key, got {spec!r}")
        params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        if convention is not None:
            params.setdefault("convention", convention)
        loss = get_loss(spec["name"], **params)
        weight = spec.get("weight", loss.default_weight)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"loss '{loss.name}': weight={weight!r} is invalid; it must be a finite number >= 0 "
                f"(default {loss.default_weight})"
            )
        losses.append(loss)
        weights.append(float(weight))
    return Objective(losses, weights)
