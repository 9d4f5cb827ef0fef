"""Input checking and conversion shared by every metric: logits or probabilities (N, K), labels (N,).

Everything is converted to float64 NumPy first, so torch tensors of any float dtype (fp16 included)
are accepted and the softmax is computed in float64 as in the official pipeline (docs/method.md §8.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import softmax

from calibprompt.settings import CONVENTIONS  # noqa: F401 - re-exported
CLOSED_SIDES = ("left", "right")
INPUT_KINDS = ("logits", "probs")

Closed = Literal["left", "right"]
Convention = Literal["standard", "reference"]

# Rows of a probability matrix must sum to 1 within this; float32 calibrator outputs need some slack.
ROW_SUM_TOL = 1e-4


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # noqa: BLE001 - re-raised with the argument named
        raise ValueError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}") from err


def check_scores(x: Any, name: str) -> np.ndarray:
    """(N, K) finite float64 matrix, K >= 2, N >= 1."""
    arr = _to_numpy(x, name)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        hint = (
            " For a binary model with one logit z per sample, pass np.stack([np.zeros_like(z), z], 1) "
            "(its softmax equals sigmoid(z))."
            if arr.ndim == 1
            else ""
        )
        raise ValueError(f"{name} must have shape (N, K), got shape {arr.shape}.{hint}")
    n, k = arr.shape
    if n == 0:
        raise ValueError(f"{name} is empty (N = 0); metrics need at least one test sample")
    if k < 2:
        raise ValueError(f"{name} has K = {k} column; pass one column per class (K >= 2)")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or inf in {bad} row(s); drop or fix those samples first")
    return arr


def check_labels(y: Any, n: int, k: int, name: str = "labels") -> np.ndarray:
    """(N,) int64 labels in [0, K)."""
    arr = _to_numpy(y, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        raise ValueError(f"{name} has shape {arr.shape}; pass a 1-D array, e.g. labels.reshape(-1)")
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries but the scores have N = {n} rows; they must match")
    if np.issubdtype(arr.dtype, np.bool_):
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{name} must be integer class indices; got non-integer values")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if n and (arr.min() < 0 or arr.max() >= k):
        raise ValueError(
            f"{name} must lie in [0, {k - 1}] for K = {k} classes; found values from {arr.min()} to {arr.max()}"
        )
    return arr


def check_probs(p: np.ndarray, name: str = "probs") -> np.ndarray:
    """Check that an (N, K) float64 matrix is a probability matrix (entries in [0, 1], rows sum to 1)."""
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1], found values in [{p.min():.4g}, {p.max():.4g}]; "
            "pass logits to calibration_metrics instead"
        )
    worst = float(np.abs(p.sum(axis=1) - 1.0).max())
    if worst > ROW_SUM_TOL:
        raise ValueError(
            f"rows of {name} must sum to 1 (largest deviation {worst:.3g} > {ROW_SUM_TOL}); "
            "renormalise them or pass logits to calibration_metrics"
        )
    return p


def check_choice(value: Any, valid: tuple[str, ...], name: str) -> str:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")
    return value


def check_n_bins(n_bins: Any, name: str = "n_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"{name} must be a positive integer, got {n_bins!r} (the paper uses 10)")
    return int(n_bins)


def probs_from(scores: Any, labels: Any, inputs: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """Validated (probs, labels): softmax in float64 for logits, checks only for probabilities."""
    check_choice(inputs, INPUT_KINDS, "inputs")
    name = "logits" if inputs == "logits" else "probs"
    x = check_scores(scores, name)
    y = check_labels(labels, x.shape[0], x.shape[1])
    # scipy's softmax subtracts the row maximum first, exactly as the official pipeline does.
    p = softmax(x, axis=1) if inputs == "logits" else check_probs(x, name)
    return p, y


@dataclass(frozen=True)
class TopLabel:
    """Top-label view of a prediction matrix: conf_i = max_k p_ik, pred_i = argmax_k p_ik."""

    probs: np.ndarray    # (N, K) float64
    labels: np.ndarray   # (N,) int64
    conf: np.ndarray     # (N,) float64
    pred: np.ndarray     # (N,) int64; ties go to the lowest class index (np.argmax)
    correct: np.ndarray  # (N,) float64, 1.0 where pred == label

    @classmethod
    def of(cls, probs: np.ndarray, labels: np.ndarray) -> "TopLabel":
        pred = probs.argmax(axis=1)
        conf = probs[np.arange(probs.shape[0]), pred]
        return cls(probs, labels, conf, pred, (pred == labels).astype(np.float64))

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def k(self) -> int:
        return int(self.probs.shape[1])


def top_label(scores: Any, labels: Any, inputs: str = "logits") -> TopLabel:
    """Validate inputs and return their top-label view."""
    return TopLabel.of(*probs_from(scores, labels, inputs))


def probs_view(probs: Any, labels: Any) -> TopLabel:
    """Validate probabilities (N, K) and labels (N,) and return their top-label view."""
    return top_label(probs, labels, inputs="probs")
