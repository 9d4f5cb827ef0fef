"""Bootstrap confidence intervals over test samples, resampled by ``scipy.stats.bootstrap``.

The N test rows are the one sample: scipy draws B resamples of N row indices with replacement from
``np.random.default_rng(seed)``, the metrics are recomputed on those rows, and the interval is

* ``method="percentile"`` (default): the (1 − level)/2 and (1 + level)/2 percentiles (NumPy's linear
  interpolation) of the B values, NaN values of a resample (e.g. mean_pred_ece when a class is never
  predicted) left out; all-NaN gives (nan, nan);
* ``method="BCa"`` or ``"basic"``: scipy's bias-corrected and accelerated (jackknife over the N rows) or
  basic interval, NaN when a resample's value is NaN.

Same seed and inputs give the same intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .inputs import INPUT_KINDS, Closed, TopLabel, check_choice, check_labels, check_scores, probs_from
from .suite import check_options, compute, metric_names

MetricFn = Callable[[np.ndarray, np.ndarray], "float | Mapping[str, float]"]


def _names(metrics: str | Sequence[str] | None, convention: str) -> tuple[str, ...]:
    if metrics is None:
        return metric_names(convention)
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise ValueError("metrics is empty; pass None for every metric or a list of metric names")
    return names


def _interval(values: list[float], level: float) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(arr, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return (float(lo), float(hi))


def bootstrap_ci(
    metrics: str | Sequence[str] | MetricFn | None,
    logits: Any,
    labels: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    inputs: str = "logits",
    n_bins: int = 10,
    convention: str = "standard",
    closed: Closed = "left",
    method: str = "percentile",
) -> dict[str, tuple[float, float]]:
    """Bootstrap CIs {metric: (low, high)} over the N test samples (``method``: "percentile", "BCa" or
    "basic", as in ``scipy.stats.bootstrap``).

    metrics: None for every metric of ``calibration_metrics(..., convention)`` (ECE-KDE under
    "reference" costs O(N²) per resample), a name or list of names, or a function
    ``fn(scores, labels) -> float | {name: float}`` called on each resample of the rows of
    ``logits`` (or of probabilities with inputs="probs"). A single float is reported as "metric".
    """
    check_choice(inputs, INPUT_KINDS, "inputs")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r} (use >= 1000 for reports)")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r} (e.g. 0.95)")
    n_bins, convention, closed = check_options(n_bins, convention, closed)
    check_choice(method, METHODS, "method")

    if callable(metrics):
        x = check_scores(logits, "logits" if inputs == "logits" else "probs")
        y = check_labels(labels, x.shape[0], x.shape[1])

        def one(idx: np.ndarray) -> Mapping[str, float]:
            value = metrics(x[idx], y[idx])
            return value if isinstance(value, Mapping) else {"metric": value}
    else:
        names = _names(metrics, convention)
        probs, y = probs_from(logits, labels, inputs)
        unknown = [n for n in names if n not in metric_names(convention)]
        if unknown:
            raise ValueError(
                f"unknown metric(s) {unknown} for convention={convention!r}; "
                f"valid names: {', '.join(metric_names(convention))}"
            )

        def one(idx: np.ndarray) -> Mapping[str, float]:
            return compute(TopLabel.of(probs[idx], y[idx]), names, n_bins, convention, closed)

    n = int(y.shape[0])
    rows = np.arange(n)
    names = list(one(rows))  # the metric names, in a fixed order

    def statistic(idx: np.ndarray) -> np.ndarray | float:
        values = one(np.asarray(idx, dtype=np.int64))
        out = np.array([float(values[name]) for name in names], dtype=np.float64)
        return out if len(out) > 1 else float(out[0])  # a scalar: scipy 1.10's BCa gives NaN for shape (1,)

    res = scipy_bootstrap((rows,), statistic, n_resamples=int(n_resamples), confidence_level=float(level),
                          method=method, seed=seed)
    if method == "percentile":
        dist = np.atleast_2d(res.bootstrap_distribution)
        return {name: _interval(list(dist[i]), float(level)) for i, name in enumerate(names)}
    low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    return {name: (float(low[i]), float(high[i])) for i, name in enumerate(names)}


METHODS = ("percentile", "BCa", "basic")


def scipy_bootstrap(data: tuple, statistic: Callable, *, n_resamples: int, confidence_level: float, method: str,
                    seed: int, vectorized: bool = False):
    """``scipy.stats.bootstrap`` (the statistic called once per resample unless ``vectorized``), with the
    generator passed under the keyword this scipy knows (``rng`` from 1.15, ``random_state`` before)."""
    import inspect
    import warnings

    from scipy import stats

    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a NaN resample; handled by the caller
        if hasattr(stats, "DegenerateDataWarning"):
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        return stats.bootstrap(data, statistic, n_resamples=n_resamples, vectorized=vectorized,
                               confidence_level=confidence_level, method=method,
                               **{key: np.random.default_rng(seed)})
