"""How good are conformal prediction sets on labelled test data? All values are fractions.

- coverage = (1/N) sum_i 1[y_i in C(x_i)]; the target is 1 - alpha.
- set size = mean_i |C(x_i)|; empty = share of empty sets; singleton = share of one-class sets.
- class-conditional coverage cov_c over the images of class c; CCV = mean_c |cov_c - (1 - alpha)|
  (the class coverage gap reported by medical conformal work) and the worst class's coverage.
- size-stratified coverage: coverage among the images whose set has size s, per size; SSCV =
  max_s |cov_s - (1 - alpha)| over the sizes that occur (Angelopoulos et al. 2021).
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
        "cp_sscv": max(abs(v["coverage"] - target) for v in per_size.values()) if per_size else float("nan"),
        "details": {"class_coverage": per_class, "size_stratified": per_size, "target": target},
    }
