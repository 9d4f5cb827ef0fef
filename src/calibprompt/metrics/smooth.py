"""SmoothECE (smECE; Błasiok & Nakkiran, 2023), the bin-free calibration error that relplot computes.

For a bandwidth σ, with K_σ a Gaussian kernel reflected at 0 and 1 and residuals r_i = conf_i − c_i:
    smECE_σ = ∫_0^1 |Σ_i K_σ(t, conf_i) r_i| dt / ∫_0^1 Σ_i K_σ(t, conf_i) dt,
the integrals taken as sums over the mesh t = linspace(0, 1, T), T = max(200, round(10/σ)).
The reported value uses σ* with σ* ≈ smECE_σ*, found by relplot's search: 10 bisection steps on
[0, 1], keeping the upper end (σ counts as "too small" while σ < smECE_σ or σ < 0.001).

This follows ``relplot.smECE`` (relplot 1.0.3, default reflected Gaussian kernel) without
depending on it: the kernel, its truncation at |t − s| ≤ 0.5, the single reflection, the mesh and
the search are the same, and so is the discretisation (linear binning onto relplot's grid, one
convolution, linear interpolation): the kernel is cut at distance 0.5, a jump large enough for the
grid to matter at the 1e-4 level, so a different grid would not reproduce relplot's numbers.
Tests check agreement with relplot.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .inputs import TopLabel, probs_view

SIGMA_FLOOR = 1e-3
SEARCH_STEPS = 10
DENSITY_EPS = 1e-4


def _reflected_sums(points: np.ndarray, weights: np.ndarray, sigma: float, mesh: np.ndarray) -> np.ndarray:
    """Σ_i w_i K_σ(t, s_i) at the mesh points t, one row per row of ``weights`` (shape (R, N)).

    The weights are spread linearly onto a uniform grid of G = max(2000, round(20/σ)) // 2 + 1 points
    (relplot's grid), convolved once with the Gaussian sampled at the offsets linspace(0, 1, G) − 0.5
    (so truncated at distance 0.5), and read off at the mesh by linear interpolation.
    """
    g = max(2000, round(20 / sigma)) // 2 + 1
    pos = points * (g - 1)
    lo = np.clip(pos.astype(np.int64), 0, g - 2)
    frac = pos - lo
    mass = np.stack(
        [np.bincount(lo, (1 - frac) * w, g) + np.bincount(lo + 1, frac * w, g) for w in weights]
    )
    # mirror images about 0 and about 1, the boundary points themselves not repeated
    ext = np.concatenate([mass[:, :0:-1], mass, mass[:, -2::-1]], axis=1)
    offsets = np.linspace(0.0, 1.0, g) - 0.5
    kernel = np.exp(-(offsets**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    size = ext.shape[1] + g - 1
    nfft = 1 << (size - 1).bit_length()
    full = np.fft.irfft(np.fft.rfft(ext, nfft, axis=1) * np.fft.rfft(kernel, nfft), nfft, axis=1)
    start = (g - 1) + g // 2
    grid = np.linspace(0.0, 1.0, g)
    return np.stack([np.interp(mesh, grid, row[start : start + g]) for row in full])


def smece_at(conf: np.ndarray, correct: np.ndarray, sigma: float) -> float:
    """smECE_σ at a fixed bandwidth σ (relplot's ``smECE_sigma``)."""
    mesh = np.linspace(0.0, 1.0, max(200, round(10 / sigma)))
    resid, dens = _reflected_sums(conf, np.stack([conf - correct, np.ones_like(conf)]), sigma, mesh)
    # relplot adds 1e-4 to the (N-scaled) density at every mesh point; kept for identical numbers
    return float(np.sum(np.abs(resid)) / np.sum(dens + DENSITY_EPS))


def smece_of(t: TopLabel) -> tuple[float, float]:
    """(smECE, σ*) of the top-label confidences."""
    conf, correct = t.conf, t.correct
    seen: dict[float, float] = {}

    def at(sigma: float) -> float:
        if sigma not in seen:
            seen[sigma] = smece_at(conf, correct, sigma)
        return seen[sigma]

    def too_small(sigma: float) -> bool:
        return sigma < SIGMA_FLOOR or sigma < at(sigma)

    if too_small(1.0):
        sigma = 1.0
    else:
        upper, lower = 1.0, 0.0
        for _ in range(SEARCH_STEPS):
            mid = (upper + lower) / 2
            if too_small(mid):
                lower = mid
            else:
                upper = mid
        sigma = upper
    return at(sigma), sigma


def smooth_ece(probs: Any, labels: Any, *, return_sigma: bool = False) -> float | tuple[float, float]:
    """Top-label SmoothECE (smECE) of probabilities: see the module docstring for the formula.

    Returns smECE, or (smECE, σ*) with return_sigma=True. Bin-free, so no ``n_bins``.
    """
    value, sigma = smece_of(probs_view(probs, labels))
    return (value, sigma) if return_sigma else value
