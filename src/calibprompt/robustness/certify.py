"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019: CERTIFY).

The smoothed classifier is g(x) = argmax_c P[f(x + eps) = c], eps ~ N(0, sigma^2 I). CERTIFY draws
``n0`` noisy copies and takes the most frequent class c_A (selection), then ``n`` fresh copies and counts
n_A, how many of them f assigns to c_A (estimation). With the one-sided Clopper-Pearson lower bound

    pA_lower = Beta^-1(alpha; n_A, n - n_A + 1)      (0 when n_A = 0)

g is certified to predict c_A within the l2 ball of radius

    R = sigma * Phi^-1(pA_lower)

with probability at least 1 - alpha, and abstains when pA_lower <= 0.5 (R would be <= 0). Certified
accuracy at radius r is the share of images that are predicted correctly with R >= r (Cohen et al.'s
``analyze.py``; PromptSmooth's own script counts R > r, available as ``strict=True``); an abstention is
never correct.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_settings(sigma: float, alpha: float, n0: int | None = None, n: int | None = None) -> None:
    """ValueError naming the bad value: sigma > 0, 0 < alpha < 1, n0 >= 1, n >= 1 and n0 <= n."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a noise level > 0 (e.g. 0.25), got {sigma!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (the failure probability) must lie strictly between 0 and 1 (e.g. 0.001), got {alpha!r}")
    for name, value in (("n0", n0), ("n", n)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if n0 is not None and n is not None and n0 > n:
        raise ValueError(f"n0 ({n0}) selection samples must not exceed n ({n}) estimation samples "
                         "(Cohen et al. use n0 = 100, n = 100,000)")


def lower_confidence_bound(n_top: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a binomial proportion from ``n_top`` of ``n``."""
    from scipy.stats import beta

    if n_top <= 0:
        return 0.0
    return float(beta.ppf(alpha, n_top, n - n_top + 1))


def certified_radius(n_top: int, n: int, sigma: float, alpha: float) -> float:
    """The certified l2 radius ``sigma * Phi^-1(pA_lower)`` of a smoothed prediction whose class got
    ``n_top`` of ``n`` noisy votes, at failure probability ``alpha``; ``float("nan")`` when it abstains
    (pA_lower <= 0.5)."""
    from scipy.stats import norm

    check_settings(sigma, alpha, n=n)
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or not 0 <= n_top <= n:
        raise ValueError(f"n_top must be a whole number between 0 and n = {n}, got {n_top!r}")
    p_lower = lower_confidence_bound(int(n_top), int(n), float(alpha))
    if p_lower <= 0.5:
        return float("nan")
    return float(sigma * norm.ppf(p_lower))


def certify_counts(selection: np.ndarray, estimation: np.ndarray, sigma: float, alpha: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """CERTIFY on vote counts: ``selection`` (N, K) counts of the n0 selection draws, ``estimation`` (N, K)
    of the n estimation draws -> (predicted class, -1 where it abstains; radius, NaN where it abstains).
    Ties in the selection go to the lower class index."""
    selection, estimation = np.asarray(selection), np.asarray(estimation)
    if selection.shape != estimation.shape or selection.ndim != 2:
        raise ValueError(f"selection and estimation counts must both be (N, K), got {selection.shape} and "
                         f"{estimation.shape}")
    top = selection.argmax(axis=1)
    n = estimation.sum(axis=1)
    radius = np.array([certified_radius(int(estimation[i, c]), int(n[i]), sigma, alpha) for i, c in enumerate(top)])
    pred = np.where(np.isnan(radius), -1, top)
    return pred, radius


def certified_accuracy(pred: np.ndarray, radius: np.ndarray, labels: np.ndarray,
                       radii: Sequence[float] = DEFAULT_RADII, strict: bool = False) -> dict[float, float]:
    """{r: share of images predicted correctly with certified radius >= r (> r with ``strict``)}."""
    pred, radius, labels = np.asarray(pred), np.asarray(radius, dtype=float), np.asarray(labels)
    correct = (pred == labels) & ~np.isnan(radius)
    out = {}
    for r in radii:
        ok = correct & ((radius > r) if strict else (radius >= r))
        out[float(r)] = float(ok.mean()) if len(ok) else float("nan")
    return out


def check_radii(radii: Sequence[float]) -> list[float]:
    values = [float(r) for r in radii]
    if not values or any(not math.isfinite(r) or r < 0 for r in values):
        raise ValueError(f"radii must be a non-empty list of numbers >= 0, got {list(radii)!r}")
    return sorted(set(values))
