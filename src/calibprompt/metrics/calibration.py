"""Standard (textbook) calibration and accuracy metrics, all returned as fractions.

Each public function takes probabilities ``probs`` (N, K) and integer ``labels`` (N,); use
``calibration_metrics`` for logits. The ``*_of`` functions do the same on a validated
:class:`~calibprompt.metrics.inputs.TopLabel` view (used by the suite and the bootstrap).
Notation: p_ik the probability of class k, conf_i = max_k p_ik, ŷ_i = argmax_k p_ik,
c_i = 1[ŷ_i = y_i], M bins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .binning import equal_mass_bins, equal_width_bins
from .inputs import CLOSED_SIDES, Closed, TopLabel, check_choice, check_n_bins, probs_view

NLL_CLIP = 1e-12


def accuracy_of(t: TopLabel) -> float:
    return float(t.correct.mean())


def confidence_of(t: TopLabel) -> float:
    return float(t.conf.mean())


def macro_f1_of(t: TopLabel, classes: np.ndarray) -> float:
    """Mean over ``classes`` of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c), 0 when the denominator is 0
    (sklearn's ``f1_score(average="macro", labels=classes)`` with its default zero_division)."""
    k = t.k
    tp = np.bincount(t.labels[t.pred == t.labels], minlength=k)
    fp = np.bincount(t.pred, minlength=k) - tp
    fn = np.bincount(t.labels, minlength=k) - tp
    num, den = 2 * tp[classes], (2 * tp + fp + fn)[classes]
    return float(np.mean(np.where(den > 0, num / np.maximum(den, 1), 0.0)))


def ece_of(t: TopLabel, n_bins: int = 10, closed: Closed = "left") -> float:
    return equal_width_bins(t.conf, t.correct, n_bins, closed).expected_gap()


def mce_of(t: TopLabel, n_bins: int = 10, closed: Closed = "left") -> float:
    return equal_width_bins(t.conf, t.correct, n_bins, closed).max_gap()


def adaptive_ece_of(t: TopLabel, n_bins: int = 10) -> tuple[float, int]:
    """(adaptive ECE, number of non-empty equal-mass bins actually used)."""
    bins = equal_mass_bins(t.conf, t.correct, n_bins)
    return bins.expected_gap(), int(bins.nonempty.sum())


def classwise_ece_of(t: TopLabel, n_bins: int = 10, closed: Closed = "left") -> float:
    onehot = np.eye(t.k)[t.labels]
    per_class = [equal_width_bins(t.probs[:, k], onehot[:, k], n_bins, closed).expected_gap() for k in range(t.k)]
    return float(np.mean(per_class))


def nll_of(t: TopLabel) -> float:
    p_true = t.probs[np.arange(t.n), t.labels]
    return float(-np.mean(np.log(np.maximum(p_true, NLL_CLIP))))


def brier_of(t: TopLabel) -> float:
    onehot = np.eye(t.k)[t.labels]
    return float(np.mean(np.sum((t.probs - onehot) ** 2, axis=1)))


def _closed(closed: Any) -> Closed:
    return check_choice(closed, CLOSED_SIDES, "closed")  # type: ignore[return-value]


def accuracy(probs: Any, labels: Any) -> float:
    """Accuracy = (1/N) Σ_i 1[ŷ_i = y_i]; ties in argmax go to the lowest class index."""
    return accuracy_of(probs_view(probs, labels))


def macro_f1(probs: Any, labels: Any, *, classes: str = "all") -> float:
    """Macro-F1 = (1/|C|) Σ_{c∈C} 2TP_c / (2TP_c + FP_c + FN_c) (0 where undefined).

    classes="all": C = {0, ..., K−1} (standard); classes="present": C = unique(labels), the official
    code's ``labels=np.unique(y)``, which ignores classes that are only predicted.
    """
    t = probs_view(probs, labels)
    check_choice(classes, ("all", "present"), "classes")
    return macro_f1_of(t, np.arange(t.k) if classes == "all" else np.unique(t.labels))


def confidence(probs: Any, labels: Any) -> float:
    """Mean confidence (1/N) Σ_i conf_i."""
    return confidence_of(probs_view(probs, labels))


def ece(probs: Any, labels: Any, n_bins: int = 10, *, closed: Closed = "left") -> float:
    """Top-label ECE = Σ_b (n_b/N) |acc_b − conf_b| over M equal-width bins (standard convention).

    Bins: closed="left" gives [a, b) with the last bin [1 − 1/M, 1]; closed="right" gives (a, b]
    with the first bin [0, 1/M]. Every sample is in exactly one bin, for weights and statistics alike.
    """
    return ece_of(probs_view(probs, labels), check_n_bins(n_bins), _closed(closed))


def mce(probs: Any, labels: Any, n_bins: int = 10, *, closed: Closed = "left") -> float:
    """MCE = max_b |acc_b − conf_b| over the non-empty equal-width bins (unweighted; bins as in ``ece``)."""
    return mce_of(probs_view(probs, labels), check_n_bins(n_bins), _closed(closed))


def adaptive_ece(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Adaptive (equal-mass) ECE = Σ_b (n_b/N) |acc_b − conf_b| over min(M, N) groups of the sorted
    confidences of near-equal size; tied confidences are never split (they join the lower group),
    so fewer groups can remain. Not netcal's *average* calibration error ("ACE")."""
    return adaptive_ece_of(probs_view(probs, labels), check_n_bins(n_bins))[0]


def classwise_ece(probs: Any, labels: Any, n_bins: int = 10, *, closed: Closed = "left") -> float:
    """Classwise ECE (Kull et al., 2019) = (1/K) Σ_k Σ_b (n_kb/N) |mean_{i∈b} 1[y_i = k] − mean_{i∈b} p_ik|,
    binning p_ik of all N samples for each class k into M equal-width bins (as in ``ece``)."""
    return classwise_ece_of(probs_view(probs, labels), check_n_bins(n_bins), _closed(closed))


def nll(probs: Any, labels: Any) -> float:
    """NLL = −(1/N) Σ_i log max(p_{i,y_i}, 1e-12) (natural log; the clip bounds it by 27.63)."""
    return nll_of(probs_view(probs, labels))


def brier(probs: Any, labels: Any) -> float:
    """Multi-class Brier score = (1/N) Σ_i Σ_k (p_ik − 1[y_i = k])², in [0, 2] (sum over classes,
    not divided by K; for K = 2 it is twice the binary Brier score of the positive class)."""
    return brier_of(probs_view(probs, labels))
