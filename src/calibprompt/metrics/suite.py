"""The metric suite: ``calibration_metrics`` and the named metrics it is made of.

One dict per evaluation, of plain Python floats (fractions, never percent), recording how it was
computed (``convention``, ``n_bins``, ``closed``). The bootstrap draws on the same names.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .calibration import (
    accuracy_of,
    adaptive_ece_of,
    brier_of,
    classwise_ece_of,
    confidence_of,
    ece_of,
    macro_f1_of,
    mce_of,
    nll_of,
)
from .inputs import (
    CLOSED_SIDES,
    CONVENTIONS,
    Closed,
    TopLabel,
    check_choice,
    check_n_bins,
    top_label,
)
from .reference import (
    ace_reference_of,
    ece_kde_reference_of,
    ece_reference_of,
    mce_reference_of,
    per_class_ece_reference_of,
)
from .smooth import smece_of

STANDARD_METRICS = (
    "accuracy", "macro_f1", "confidence", "ece", "mce", "ace", "adaptive_ece",
    "classwise_ece", "nll", "brier", "smece",
)
REFERENCE_EXTRAS = ("ece_kde", "ece_kde_reference", "mean_gt_ece", "mean_pred_ece")


def metric_names(convention: str = "standard") -> tuple[str, ...]:
    """Names of the metric values ``calibration_metrics`` returns under ``convention``."""
    check_choice(convention, CONVENTIONS, "convention")
    return STANDARD_METRICS + (REFERENCE_EXTRAS if convention == "reference" else ())


def check_options(n_bins: Any, convention: Any, closed: Any) -> tuple[int, str, Closed]:
    n_bins = check_n_bins(n_bins)
    check_choice(convention, CONVENTIONS, "convention")
    check_choice(closed, CLOSED_SIDES, "closed")
    if convention == "reference" and closed != "left":
        raise ValueError(
            'closed="right" applies to the standard convention only; the reference convention fixes '
            'the official bins. Use convention="standard" with closed="right", or drop closed'
        )
    return n_bins, convention, closed


def compute(t: TopLabel, names: tuple[str, ...], n_bins: int, convention: str, closed: Closed) -> dict[str, Any]:
    """Values of ``names`` (from ``metric_names(convention)`` plus "ace_effective_bins") on ``t``."""
    ref = convention == "reference"
    memo: dict[str, Any] = {}

    def shared(key: str, fn: Callable[[], Any]) -> Any:
        if key not in memo:
            memo[key] = fn()
        return memo[key]

    def ace() -> tuple[float, int]:
        return shared("ace", lambda: ace_reference_of(t, n_bins) if ref else adaptive_ece_of(t, n_bins))

    def kde() -> float:
        return shared("kde", lambda: ece_kde_reference_of(t))

    def per_class() -> dict[str, Any]:
        return shared("per_class", lambda: per_class_ece_reference_of(t, n_bins))

    table: dict[str, Callable[[], Any]] = {
        "accuracy": lambda: accuracy_of(t),
        # official: labels=unique(y); standard: every one of the K classes
        "macro_f1": lambda: macro_f1_of(t, np.unique(t.labels) if ref else np.arange(t.k)),
        "confidence": lambda: confidence_of(t),
        "ece": lambda: ece_reference_of(t, n_bins) if ref else ece_of(t, n_bins, closed),
        "mce": lambda: mce_reference_of(t, n_bins) if ref else mce_of(t, n_bins, closed),
        "ace": lambda: ace()[0],
        "adaptive_ece": lambda: ace()[0],
        "ace_effective_bins": lambda: ace()[1],
        # not in the official code: the same definition under both conventions
        "classwise_ece": lambda: classwise_ece_of(t, n_bins, closed),
        "nll": lambda: nll_of(t),
        "brier": lambda: brier_of(t),
        "smece": lambda: smece_of(t)[0],
        "ece_kde": kde,
        "ece_kde_reference": kde,
        "mean_gt_ece": lambda: per_class()["mean_gt_ece"],
        "mean_pred_ece": lambda: per_class()["mean_pred_ece"],
    }
    valid = metric_names(convention) + ("ace_effective_bins",)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown} for convention={convention!r}; valid names: {', '.join(valid)}"
        )
    return {name: table[name]() for name in names}


def _suite(t: TopLabel, n_bins: Any, convention: Any, closed: Any) -> dict[str, Any]:
    n_bins, convention, closed = check_options(n_bins, convention, closed)
    head = {"convention": convention, "n_bins": n_bins, "closed": closed, "n_samples": t.n, "n_classes": t.k}
    names = metric_names(convention) + ("ace_effective_bins",)
    return head | compute(t, names, n_bins, convention, closed)


def calibration_metrics(
    logits: Any, labels: Any, n_bins: int = 10, convention: str = "standard", *, closed: Closed = "left"
) -> dict[str, Any]:
    """All calibration and accuracy metrics of logits (N, K) against labels (N,), as fractions.

    Softmax in float64; conf = max p, ŷ = argmax p. Keys: accuracy, macro_f1, confidence, ece, mce,
    ace (= adaptive_ece, the equal-mass ECE), ace_effective_bins, classwise_ece, nll, brier, smece,
    plus convention, n_bins, closed, n_samples, n_classes. convention="reference" reproduces the
    official code (docs/method.md §8.2) and adds ece_kde (= ece_kde_reference), mean_gt_ece, mean_pred_ece.
    closed="right" switches the standard equal-width bins to (a, b]. See docs/metrics.md.
    """
    check_options(n_bins, convention, closed)
    return _suite(top_label(logits, labels, "logits"), n_bins, convention, closed)


def calibration_metrics_from_probs(
    probs: Any, labels: Any, n_bins: int = 10, convention: str = "standard", *, closed: Closed = "left"
) -> dict[str, Any]:
    """``calibration_metrics`` for probabilities (N, K) (entries in [0, 1], rows summing to 1 within 1e-4),
    e.g. the output of a post-hoc calibrator."""
    check_options(n_bins, convention, closed)
    return _suite(top_label(probs, labels, "probs"), n_bins, convention, closed)
