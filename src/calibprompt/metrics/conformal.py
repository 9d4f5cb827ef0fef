"""How good are conformal prediction sets on labelled test data? All values are fractions.

- coverage = (1/N) sum_i 1[y_i in C(x_i)]; the target is 1 - alpha.
- set size = mean_i |C(x_i)|; empty = share of empty sets; singleton = share of one-class sets.
- class-conditional coverage cov_c over the images of class c; CCV = mean_c |cov_c - (1 - alpha)|
  (the class coverage gap reported by medical conformal work) and the worst class's coverage.
- size-stratified coverage: coverage among the images whose set has size s, per size; SSCV =
  max_b |cov_b - (1 - alpha)| over the size bins that occur, bins 0-1, 2-3, 4-10, 11-100, 101+ as in
  Angelopoulos et al. 2021 (empty sets, never covering, share the bin of single-class sets).
"""

from __future__ import annotations

import numpy as np


def conformal_metrics(sets, labels, alpha: float) -> dict:
    """Flat metrics (``cp_*`` keys, for tables) and the per-class / per-size details (``details``)."""
    sets = np.asarray(sets, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    if sets.ndim != 2 or labels.shape != (sets.shape[0],):
        raise ValueError(f"sets must be (N, K) booleans and labels (N,), got {sets.shape} and {labels.shape}")
    n, k = sets.shape
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be class indices in 0..{k - 1}, got values from {labels.min()} to {labels.max()}")
    target = 1.0 - float(alpha)
    hit = sets[np.arange(n), labels]
    size = sets.sum(1)
    per_class = {c: float(hit[labels == c].mean()) for c in range(k) if (labels == c).any()}
    per_size = {int(s): {"n": int((size == s).sum()), "coverage": float(hit[size == s].mean())}
                for s in np.unique(size)}
    return {
        "cp_coverage": float(hit.mean()) if n else float("nan"),
        "cp_set_size": float(size.mean()) if n else float("nan"),
        "cp_empty": float((size == 0).mean()) if n else float("nan"),
        "cp_singleton": float((size == 1).mean()) if n else float("nan"),
        "cp_ccv": float(np.mean([abs(v - target) for v in per_class.values()])) if per_class else float("nan"),
        "cp_worst_class_coverage": min(per_class.values()) if per_class else float("nan"),
        "cp_sscv": _sscv(size, hit, target),
        "details": {"class_coverage": per_class, "size_stratified": per_size, "target": target},
    }


SIZE_BINS = ((0, 1), (2, 3), (4, 10), (11, 100), (101, None))


def _sscv(size: np.ndarray, hit: np.ndarray, target: float) -> float:
    gaps = []
    for low, high in SIZE_BINS:
        inside = (size >= low) & ((size <= high) if high is not None else True)
        if inside.any():
            gaps.append(abs(float(hit[inside].mean()) - target))
    return max(gaps) if gaps else float("nan")
