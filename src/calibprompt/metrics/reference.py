"""The official CalibPrompt / DAC metric conventions (docs/method.md §8.2), reproduced for parity.

These are *not* the recommended definitions; each difference from the standard ones is listed in
docs/metrics.md (Q4 conf = 1.0 in ECE, Q5 weighted MCE, sklearn quantile bins for ACE, Q9 ECE-KDE,
macro-F1 over the present classes). Inputs: probabilities (N, K) and labels (N,).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .binning import (
    histogram_digitize_bins_reference,
    interior_digitize_bins_reference,
    quantile_bins_reference,
)
from .inputs import TopLabel, check_n_bins, probs_view

# Rows per chunk of the N x N kernel in ECE-KDE: one chunk (the official computation) up to
# N = 4096, about 64 MB of float32 per chunk beyond.
_KDE_CHUNK_ELEMENTS = 1 << 24


def ece_reference_of_arrays(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    if conf.shape[0] == 0:
        return math.nan  # the official code divides by len(conf) = 0 here
    return histogram_digitize_bins_reference(conf, correct, n_bins).expected_gap()


def ece_reference_of(t: TopLabel, n_bins: int = 10) -> float:
    return ece_reference_of_arrays(t.conf, t.correct, n_bins)


def mce_reference_of(t: TopLabel, n_bins: int = 10) -> float:
    bins = interior_digitize_bins_reference(t.conf, t.correct, n_bins)
    # gap * n_b / N in the official order of operations
    return float(np.max((bins.gap * bins.count / bins.n)[bins.nonempty]))


def ace_reference_of(t: TopLabel, n_bins: int = 10) -> tuple[float, int]:
    """(ACE, number of non-empty bins after sklearn's pruning)."""
    bins = quantile_bins_reference(t.conf, t.correct, n_bins)
    return bins.expected_gap(), int(bins.nonempty.sum())


def kde_bandwidth_reference(n: int) -> float:
    """The official size rule: 0.3 if N < 100, 0.2 if N < 500, 0.1 if N < 2000, else 0.05."""
    return 0.3 if n < 100 else 0.2 if n < 500 else 0.1 if n < 2000 else 0.05


def ece_kde_reference_of(t: TopLabel, bandwidth: float | None = None) -> float:
    import torch  # deferred: only this metric needs it

    conf = torch.tensor(t.conf, dtype=torch.float32)
    acc = torch.tensor(t.correct, dtype=torch.float32)
    h = kde_bandwidth_reference(t.n) if bandwidth is None else float(bandwidth)
    rows = max(1, _KDE_CHUNK_ELEMENTS // t.n)
    acc_hat = []
    for start in range(0, t.n, rows):
        block = conf[start : start + rows].unsqueeze(1) - conf.unsqueeze(0)
        kernel = torch.exp(-(block**2) / (2 * h**2))
        # leave-one-out: zero each sample's weight on itself (the block's diagonal offset by start)
        r = torch.arange(kernel.shape[0])
        kernel[r, r + start] = 0.0
        kernel = kernel / torch.clamp(kernel.sum(dim=1, keepdim=True), min=1e-10)
        acc_hat.append(kernel @ acc)
    return float(torch.mean(torch.abs(conf - torch.cat(acc_hat))).item())


def per_class_ece_reference_of(t: TopLabel, n_bins: int = 10) -> dict[str, Any]:
    """Official per-class diagnostics for each class c present in the labels.

    gt-based: the official ECE on the samples with y = c; pred-based: on the samples with ŷ = c
    (NaN when c is never predicted, as in the official code). Means are plain means, so one NaN
    makes ``mean_pred_ece`` NaN.
    """
    classes = np.unique(t.labels)
    gt = [ece_reference_of_arrays(t.conf[t.labels == c], t.correct[t.labels == c], n_bins) for c in classes]
    pr = [ece_reference_of_arrays(t.conf[t.pred == c], t.correct[t.pred == c], n_bins) for c in classes]
    return {
        "classes": [int(c) for c in classes],
        "gt_ece": gt,
        "pred_ece": pr,
        "mean_gt_ece": float(np.mean(gt)),
        "mean_pred_ece": float(np.mean(pr)),
    }


def ece_reference(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Official ECE = Σ_b w_b |conf_b − acc_b| with edges linspace(0, 1, M + 1).

    conf_b, acc_b: means over ``np.digitize(conf, edges) − 1 == b`` (half-open [a, b), 0 if empty);
    w_b = ``np.histogram(conf, edges)[0][b] / N`` (last bin closed). A sample with conf = 1.0 adds
    weight to the last bin but not to its means, so it adds no gap (Q4).
    """
    return ece_reference_of(probs_view(probs, labels), check_n_bins(n_bins))


def mce_reference(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Official MCE = max_b (n_b/N) |acc_b − conf_b| over non-empty bins, a *weighted* maximum (Q5);
    bins from ``np.digitize(conf, linspace(0, 1, M + 1)[1:-1])``: [a, b), last bin [1 − 1/M, 1]."""
    return mce_reference_of(probs_view(probs, labels), check_n_bins(n_bins))


def ace_reference(probs: Any, labels: Any, n_bins: int = 10) -> float:
    """Official ACE (adaptive ECE) = Σ_b (n_b/N) |acc_b − conf_b| over the bins of
    KBinsDiscretizer(n_bins=M, strategy="quantile", encode="ordinal") with linear percentiles;
    bins narrower than 1e-8 are removed, so fewer than M may remain."""
    return ace_reference_of(probs_view(probs, labels), check_n_bins(n_bins))[0]


def ece_kde_reference(probs: Any, labels: Any, bandwidth: float | None = None) -> float:
    """The official "ECE-KDE" (Q9; an ad-hoc estimator, not Popordanoska et al. 2022).

    In float32: w_ij = exp(−(conf_i − conf_j)² / (2h²)) for j ≠ i, w_ii = 0, rows divided by
    max(Σ_j w_ij, 1e-10); acc_hat_i = Σ_j w_ij c_j; value = (1/N) Σ_i |conf_i − acc_hat_i| (p = 1).
    h from ``kde_bandwidth_reference(N)`` unless given. Costs O(N²) time.
    """
    return ece_kde_reference_of(probs_view(probs, labels), bandwidth)


def per_class_ece_reference(probs: Any, labels: Any, n_bins: int = 10) -> dict[str, Any]:
    """Official gt-based and pred-based per-class ECE lists and their means (see ``per_class_ece_reference_of``)."""
    return per_class_ece_reference_of(probs_view(probs, labels), check_n_bins(n_bins))
