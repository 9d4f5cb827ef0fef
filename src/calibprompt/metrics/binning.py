"""Bin assignment and per-bin statistics for binned calibration errors.

A bin summary pairs scores s_i (a top-label confidence, or p_ik for one class) with outcomes
o_i in {0, 1} (correctness, or 1[y_i = k]). For bin b with n_b samples:
    conf_b = mean of s_i in b,  acc_b = mean of o_i in b  (0 for an empty bin),  w_b = n_b / N.

Edges of equal-width bins are the float64 values ``np.linspace(0, 1, M + 1)``, the same numbers
NumPy's histogram, the official code and netcal use. Note ``linspace(0, 1, 11)[3]`` is
0.30000000000000004, so a confidence written as 0.3 (0.29999999999999999) falls in [0.2, 0.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .inputs import Closed


@dataclass(frozen=True)
class Bins:
    """Per-bin summary. ``count`` gives the weights; ``stat_count`` the samples behind the means.

    The two differ only in the official ECE, where conf = 1.0 is weighted but not averaged (Q4).
    """

    lo: np.ndarray          # (B,) lower edge of each bin
    hi: np.ndarray          # (B,) upper edge of each bin
    count: np.ndarray       # (B,) n_b, used for the weights w_b = n_b / N
    stat_count: np.ndarray  # (B,) samples averaged into mean_conf and accuracy
    mean_conf: np.ndarray   # (B,) conf_b, 0 where stat_count is 0
    accuracy: np.ndarray    # (B,) acc_b (mean outcome), 0 where stat_count is 0
    n: int                  # N, the number of samples summarised

    @property
    def gap(self) -> np.ndarray:
        return np.abs(self.accuracy - self.mean_conf)

    @property
    def weight(self) -> np.ndarray:
        return self.count / self.n

    @property
    def nonempty(self) -> np.ndarray:
        return self.stat_count > 0

    def expected_gap(self) -> float:
        """Σ_b w_b |acc_b − conf_b| (the ECE of these bins)."""
        return float(np.sum(self.weight * self.gap))

    def max_gap(self) -> float:
        """max_b |acc_b − conf_b| over non-empty bins (unweighted)."""
        return float(self.gap[self.nonempty].max())

    def records(self) -> list[dict]:
        """One JSON-ready dict per bin."""
        out = []
        for b in range(len(self.count)):
            rec = {
                "lo": float(self.lo[b]),
                "hi": float(self.hi[b]),
                "count": int(self.count[b]),
                "mean_confidence": float(self.mean_conf[b]),
                "accuracy": float(self.accuracy[b]),
                "gap": float(self.gap[b]),
            }
            if self.stat_count[b] != self.count[b]:
                rec["count_in_statistics"] = int(self.stat_count[b])
            out.append(rec)
        return out


def summarise(
    scores: np.ndarray,
    outcomes: np.ndarray,
    idx: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    count: np.ndarray | None = None,
) -> Bins:
    """Bin means from a bin index per sample; samples with idx outside [0, B) are left out."""
    n_bins = len(lo)
    inside = (idx >= 0) & (idx < n_bins)
    i = idx[inside]
    stat_count = np.bincount(i, minlength=n_bins)
    sum_s = np.bincount(i, weights=scores[inside], minlength=n_bins)
    sum_o = np.bincount(i, weights=outcomes[inside], minlength=n_bins)
    safe = np.maximum(stat_count, 1)
    mean_conf = np.where(stat_count > 0, sum_s / safe, 0.0)
    accuracy = np.where(stat_count > 0, sum_o / safe, 0.0)
    return Bins(
        lo=lo, hi=hi, count=stat_count if count is None else count, stat_count=stat_count,
        mean_conf=mean_conf, accuracy=accuracy, n=int(scores.shape[0]),
    )


def width_edges(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def equal_width_index(scores: np.ndarray, n_bins: int, closed: Closed = "left") -> np.ndarray:
    """Bin of each score among M equal-width bins; every score in [0, 1] lands in exactly one.

    closed="left":  [a, b), last bin closed [1 − 1/M, 1].
    closed="right": (a, b], first bin closed [0, 1/M] (C-TPT style, with 0 kept).
    """
    edges = width_edges(n_bins)
    if closed == "left":
        return np.minimum(np.searchsorted(edges, scores, side="right") - 1, n_bins - 1)
    return np.maximum(np.searchsorted(edges, scores, side="left") - 1, 0)


def equal_width_bins(scores: np.ndarray, outcomes: np.ndarray, n_bins: int, closed: Closed = "left") -> Bins:
    edges = width_edges(n_bins)
    return summarise(scores, outcomes, equal_width_index(scores, n_bins, closed), edges[:-1], edges[1:])


def equal_mass_index(scores: np.ndarray, n_bins: int) -> np.ndarray:
    """Group of each score when the sorted scores are cut into min(M, N) near-equal groups.

    Sizes follow ``np.array_split`` (the first N mod M groups hold one extra sample). A cut that
    would fall inside a run of tied scores moves to the end of the run, so ties are never split and
    stay in the lower group; cuts that then coincide merge, leaving fewer groups. Deterministic, and
    the same assignment as uncertainty-calibration's ``get_equal_bins`` (midpoint cuts, (a, b]).
    """
    n = scores.shape[0]
    m = min(n_bins, n)
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    sizes = np.full(m, n // m)
    sizes[: n % m] += 1
    cuts = np.cumsum(sizes)[:-1]  # sorted positions where a new group starts
    cuts = np.unique(np.searchsorted(s, s[cuts - 1], side="right"))
    cuts = cuts[cuts < n]
    idx = np.empty(n, dtype=np.int64)
    idx[order] = np.searchsorted(cuts, np.arange(n), side="right")
    return idx


def equal_mass_bins(scores: np.ndarray, outcomes: np.ndarray, n_bins: int) -> Bins:
    idx = equal_mass_index(scores, n_bins)
    groups = int(idx.max()) + 1
    lo = np.full(groups, np.inf)
    hi = np.full(groups, -np.inf)
    np.minimum.at(lo, idx, scores)
    np.maximum.at(hi, idx, scores)
    return summarise(scores, outcomes, idx, lo, hi)


def quantile_bins_reference(scores: np.ndarray, outcomes: np.ndarray, n_bins: int) -> Bins:
    """Equal-mass bins exactly as sklearn's KBinsDiscretizer(strategy="quantile", encode="ordinal").

    Edges are np.percentile at 0, 100/M, ..., 100 with *linear* interpolation (sklearn's default
    before 1.9; fixed here so the installed sklearn does not matter). Edges closer than 1e-8 to the
    previous one are dropped (bins narrower than 1e-8 removed), bins are right-open via
    searchsorted(interior edges, side="right"), and a constant input gives one bin (−inf, inf).
    sklearn's subsampling above 200,000 samples is not reproduced: all samples are used.
    """
    if scores.min() == scores.max():
        edges = np.array([-np.inf, np.inf])
    else:
        edges = np.percentile(scores, np.linspace(0, 100, n_bins + 1), method="linear").astype(np.float64)
        edges = edges[np.ediff1d(edges, to_begin=np.inf) > 1e-8]
    idx = np.searchsorted(edges[1:-1], scores, side="right")
    return summarise(scores, outcomes, idx, edges[:-1], edges[1:])


def histogram_digitize_bins_reference(scores: np.ndarray, outcomes: np.ndarray, n_bins: int) -> Bins:
    """The official ECE bins (Q4): statistics from ``np.digitize(s, edges) − 1`` (half-open [a, b),
    so s = 1.0 gets index M and is left out), weights from ``np.histogram(s, edges)`` (last bin closed)."""
    edges = width_edges(n_bins)
    idx = np.digitize(scores, edges) - 1
    count = np.histogram(scores, edges)[0]
    return summarise(scores, outcomes, idx, edges[:-1], edges[1:], count=count)


def interior_digitize_bins_reference(scores: np.ndarray, outcomes: np.ndarray, n_bins: int) -> Bins:
    """The official MCE bins: ``np.digitize(s, linspace(0, 1, M + 1)[1:-1])``, i.e. [a, b) with the
    last bin [1 − 1/M, 1] closed, one assignment for counts and statistics."""
    edges = width_edges(n_bins)
    idx = np.digitize(scores, edges[1:-1])
    return summarise(scores, outcomes, idx, edges[:-1], edges[1:])
