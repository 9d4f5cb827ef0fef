"""Binning calibrators: histogram binning (hb) and isotonic regression (iso). Their output is the log of
the calibrated probabilities, so softmax of it gives them back."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import softmax

from calibprompt.calibration.base import Calibrator, register_calibrator

_PROB_FLOOR = 1e-12  # floor before taking logs of binned probabilities (a bin may hold no positives)

# --------------------------------------------------------------------------- binning calibrators
def _log_of(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities of rows renormalised to sum 1; softmax of the result gives the rows back."""
    probs = np.clip(probs, _PROB_FLOOR, None)
    return np.log(probs / probs.sum(axis=1, keepdims=True))


def _renormalise(calibrated: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1; a row that is all zero keeps the uncalibrated probabilities."""
    total = calibrated.sum(axis=1, keepdims=True)
    return np.where(total > 0, calibrated / np.where(total > 0, total, 1.0), original)


@register_calibrator
class HistogramBinning(Calibrator):
    """Histogram binning with ``n_bins`` fixed equal-width bins on [0, 1] (last bin closed).

    top-label (default): the confidence max_k p_k is replaced by the validation accuracy of its bin, and
    the other classes share the rest in proportion to their probabilities.
    one-vs-rest: each p_k is replaced by the validation frequency of class k in its bin, then rows are
    renormalised. A bin that held no validation sample leaves its inputs unchanged.
    The calibrated top class may fall below another class, so the argmax can change.
    """

    name = "hb"

    def __init__(self, n_bins: int = 10, mode: str = "top-label") -> None:
        super().__init__()
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"{self.name}: n_bins must be a positive integer, got {n_bins!r}")
        if mode not in ("top-label", "one-vs-rest"):
            raise ValueError(f"{self.name}: mode={mode!r} is invalid; valid choices: 'top-label', 'one-vs-rest'")
        self.n_bins, self.mode = n_bins, mode
        self.values_: list[list[float | None]] | None = None  # per column (1 for top-label, K for one-vs-rest)
        self.counts_: list[list[int]] | None = None

    def _min_samples(self, k: int) -> int:
        return max(self.min_samples, self.n_bins)

    def _bin(self, p: np.ndarray) -> np.ndarray:
        inner = np.linspace(0.0, 1.0, self.n_bins + 1)[1:-1]
        return np.searchsorted(inner, p, side="right")  # [a, b) bins, the last one [a, 1]

    def _fit_column(self, p: np.ndarray, target: np.ndarray) -> tuple[list[float | None], list[int]]:
        idx = self._bin(p)
        counts = np.bincount(idx, minlength=self.n_bins)
        sums = np.bincount(idx, weights=target.astype(float), minlength=self.n_bins)
        values = [float(s / c) if c else None for s, c in zip(sums, counts)]
        return values, counts.tolist()

    def _apply_column(self, p: np.ndarray, column: int) -> np.ndarray:
        table = np.array([np.nan if v is None else v for v in self.values_[column]])
        mapped = table[self._bin(p)]
        return np.where(np.isnan(mapped), p, mapped)

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        probs = softmax(logits, axis=1)
        if self.mode == "top-label":
            fitted = [self._fit_column(probs.max(1), probs.argmax(1) == labels)]
        else:
            fitted = [self._fit_column(probs[:, k], labels == k) for k in range(probs.shape[1])]
        self.values_ = [v for v, _ in fitted]
        self.counts_ = [c for _, c in fitted]

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits, axis=1)
        if self.mode == "one-vs-rest":
            cal = np.stack([self._apply_column(probs[:, k], k) for k in range(probs.shape[1])], axis=1)
            return _log_of(_renormalise(cal, probs))
        rows = np.arange(len(probs))
        top = probs.argmax(1)
        conf = probs[rows, top]
        new_conf = self._apply_column(conf, 0)
        rest = 1.0 - conf
        # the other classes keep their relative sizes and share 1 - new_conf
        scale = np.where(rest > 0, (1.0 - new_conf) / np.where(rest > 0, rest, 1.0), 0.0)
        cal = probs * scale[:, None]
        even = (rest <= 0) & (new_conf < 1)  # conf was exactly 1: spread the remainder evenly
        cal[even] = ((1.0 - new_conf[even]) / (probs.shape[1] - 1))[:, None]
        cal[rows, top] = new_conf
        return _log_of(cal)

    def _fitted(self) -> dict[str, Any]:
        return {"edges": np.linspace(0.0, 1.0, self.n_bins + 1).tolist(), "values": self.values_, "counts": self.counts_}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.values_, self.counts_ = fitted["values"], fitted["counts"]


@register_calibrator
class IsotonicCalibration(Calibrator):
    """Isotonic regression of 1[y = k] on p_k for each class k (one-vs-rest), then renormalised.

    Fitted with sklearn's IsotonicRegression (out-of-bounds clipped); the fitted step functions are
    stored as thresholds and applied by linear interpolation, exactly as sklearn predicts.
    """

    name = "iso"

    def __init__(self) -> None:
        super().__init__()
        self.thresholds_: list[dict[str, list[float]]] | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.isotonic import IsotonicRegression

        probs = softmax(logits, axis=1)
        self.thresholds_ = []
        for k in range(probs.shape[1]):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs[:, k], labels == k)
            self.thresholds_.append({"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits, axis=1)
        cal = np.stack([np.interp(probs[:, k], t["x"], t["y"]) for k, t in enumerate(self.thresholds_)], axis=1)
        return _log_of(_renormalise(cal, probs))

    def _fitted(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds_}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.thresholds_ = fitted["thresholds"]


