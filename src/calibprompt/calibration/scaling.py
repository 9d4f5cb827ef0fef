"""Scaling calibrators: temperature (ts), a temperature carried from another dataset (zs-ts), and
vector scaling (vs). Each is fitted by NLL in float64 on validation logits."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from calibprompt.calibration.base import Calibrator, _nll, register_calibrator

# --------------------------------------------------------------------------- temperature scaling
@register_calibrator
class TemperatureScaling(Calibrator):
    """z / T with T = argmin NLL on validation data (float64).

    NLL is convex in 1/T, hence unimodal in log T; a bounded Brent search over log T in
    [log t_min, log t_max] finds the minimum without tuning a learning rate. T > 0 keeps the argmax.
    """

    name = "ts"
    preserves_argmax = True

    def __init__(self, t_min: float = 1e-3, t_max: float = 1e3) -> None:
        super().__init__()
        if not (0 < t_min < 1 < t_max):
            raise ValueError(f"{self.name}: need 0 < t_min < 1 < t_max, got t_min={t_min}, t_max={t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.temperature_: float | None = None
        self.nll_before_ = self.nll_after_ = math.nan

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        res = minimize_scalar(
            lambda log_t: _nll(logits / math.exp(log_t), labels), bounds=(lo, hi), method="bounded",
            options={"xatol": 1e-9},
        )
        log_t = float(res.x)
        self.nll_before_ = _nll(logits, labels)
        self.nll_after_ = _nll(logits / math.exp(log_t), labels)
        if self.nll_after_ > self.nll_before_:  # never worse than doing nothing
            log_t, self.nll_after_ = 0.0, self.nll_before_
        self.temperature_ = math.exp(log_t)
        self.at_bound_ = ""
        if min(log_t - lo, hi - log_t) < 1e-3:
            accuracy = float(np.mean(logits.argmax(axis=1) == labels))
            if hi - log_t < 1e-3:
                cause = (f"the {len(labels)} validation samples are predicted at {accuracy:.0%} accuracy, so the "
                         "flattest probabilities fit them best (predictions no better than chance, or confidently "
                         "wrong)")
            else:
                cause = (f"the {len(labels)} validation samples are predicted at {accuracy:.0%} accuracy, so NLL "
                         "keeps falling as probabilities sharpen (too few or too easy validation samples)")
            self.at_bound_ = (f"temperature {self.temperature_:.4g} at the search bound [{self.t_min:g}, "
                              f"{self.t_max:g}]: {cause}")
            warnings.warn(f"{self.name}: {self.at_bound_}", stacklevel=3)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return logits / self.temperature_

    def _fitted(self) -> dict[str, Any]:
        return {"temperature": self.temperature_, "nll_before": self.nll_before_, "nll_after": self.nll_after_,
                "at_bound": getattr(self, "at_bound_", "")}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.temperature_ = float(fitted["temperature"])
        self.nll_before_ = float(fitted.get("nll_before", math.nan))
        self.nll_after_ = float(fitted.get("nll_after", math.nan))


@register_calibrator
class ZeroShotTemperature(TemperatureScaling):
    """A temperature fitted on one dataset's (zero-shot) logits, saved, and reused on another.

    The temperature does not depend on K, so ``transform`` accepts any number of classes.
    ``fit(..., source="dataset name")`` records where it came from.
    """

    name = "zs-ts"
    as_suffix = False  # its temperature comes from another dataset, not from the run's shots
    check_num_classes = False

    def __init__(self, t_min: float = 1e-3, t_max: float = 1e3) -> None:
        super().__init__(t_min, t_max)
        self.source_: str | None = None

    def fit(self, val_logits: Any, val_labels: Any, *, source: str | None = None) -> "ZeroShotTemperature":
        super().fit(val_logits, val_labels)
        self.source_ = source
        return self

    def _fitted(self) -> dict[str, Any]:
        return {**super()._fitted(), "source": self.source_}

    def _restore(self, fitted: dict[str, Any]) -> None:
        super()._restore(fitted)
        self.source_ = fitted.get("source")


# --------------------------------------------------------------------------- vector scaling
@register_calibrator
class VectorScaling(Calibrator):
    """z'_k = w_k z_k + b_k, (w, b) = argmin NLL + reg·(‖w − 1‖² + ‖b‖²) by L-BFGS (float64).

    The small ``reg`` keeps (w, b) finite when the validation set is separable. The bias can move the
    argmax, so accuracy may change.
    """

    name = "vs"

    def __init__(self, reg: float = 1e-4, max_iter: int = 500) -> None:
        super().__init__()
        if reg < 0:
            raise ValueError(f"{self.name}: reg must be >= 0, got {reg}")
        self.reg, self.max_iter = float(reg), int(max_iter)
        self.w_: np.ndarray | None = None
        self.b_: np.ndarray | None = None

    def _min_samples(self, k: int) -> int:
        return max(self.min_samples, 2 * k)  # 2K parameters

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        n, k = logits.shape
        onehot = np.eye(k)[labels]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:k], theta[k:]
            z = logits * w + b
            logp = log_softmax(z, axis=1)
            grad_z = (np.exp(logp) - onehot) / n
            value = -np.sum(onehot * logp) / n + self.reg * (np.sum((w - 1) ** 2) + np.sum(b**2))
            grad = np.concatenate([(grad_z * logits).sum(0) + 2 * self.reg * (w - 1), grad_z.sum(0) + 2 * self.reg * b])
            return value, grad

        theta0 = np.concatenate([np.ones(k), np.zeros(k)])
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        theta = res.x if objective(res.x)[0] <= objective(theta0)[0] else theta0
        self.w_, self.b_ = theta[:k].copy(), theta[k:].copy()

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return logits * self.w_ + self.b_

    def _fitted(self) -> dict[str, Any]:
        return {"w": self.w_.tolist(), "b": self.b_.tolist()}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.w_, self.b_ = np.asarray(fitted["w"], float), np.asarray(fitted["b"], float)


