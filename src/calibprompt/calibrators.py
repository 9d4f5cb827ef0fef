"""Post-hoc calibrators fitted on validation logits (sklearn-like: ``fit`` / ``transform``).

| name   | what                                                   | keeps argmax (accuracy)? |
|--------|--------------------------------------------------------|--------------------------|
| ts     | temperature scaling: z / T, T by NLL (float64)         | yes (T > 0)              |
| zs-ts  | temperature fitted on one dataset, saved, reused       | yes                      |
| vs     | vector scaling: w ⊙ z + b per class, by NLL            | no (the bias can flip)   |
| hb     | histogram binning (top-label or one-vs-rest)           | no                       |
| iso    | isotonic regression one-vs-rest, then renormalised     | no                       |

``transform`` returns logits: scaled logits for ts/zs-ts/vs, log-probabilities for hb/iso, so that
softmax of the output is the calibrated probability in every case. Inputs may be numpy arrays or torch
tensors; the output is float64 of the same kind (a torch output lives on the input's device).
Every fitted calibrator can be saved to JSON (``save``) and restored (``load_calibrator``).
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from .settings import atomic_write_json

_PROB_FLOOR = 1e-12  # floor before taking logs of binned probabilities (a bin may hold no positives)


# --------------------------------------------------------------------------- input handling
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x)


def _like(out: np.ndarray, like: Any) -> Any:
    """``out`` as the same kind of array as the input ``like`` (torch stays torch, on its device)."""
    if hasattr(like, "detach"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(out)).to(like.device)
    return out


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels]))


class Calibrator:
    """Base class: input validation, fit/transform plumbing, JSON save and load."""

    name: ClassVar[str] = ""
    preserves_argmax: ClassVar[bool] = False
    min_samples: ClassVar[int] = 10
    check_num_classes: ClassVar[bool] = True

    def __init__(self) -> None:
        self.num_classes: int | None = None
        self.n_fit: int = 0

    # -------------------------------------------------------------- public API
    def fit(self, val_logits: Any, val_labels: Any) -> "Calibrator":
        logits = self._logits(val_logits, "fit")
        labels = self._labels(val_labels, logits.shape, "fit")
        needed = self._min_samples(logits.shape[1])
        if len(labels) < needed:
            raise ValueError(
                f"{self.name}.fit: got {len(labels)} validation samples; at least {needed} are needed. "
                f"Hold out more validation data (e.g. more val shots per class)."
            )
        self.num_classes = logits.shape[1]
        self.n_fit = len(labels)
        self._fit(logits, labels)
        return self

    def transform(self, logits: Any) -> Any:
        if self.num_classes is None:
            raise ValueError(f"{self.name}: call fit(val_logits, val_labels) (or load a saved one) before transform")
        z = self._logits(logits, "transform")
        if self.check_num_classes and z.shape[1] != self.num_classes:
            raise ValueError(
                f"{self.name}.transform: fitted on K={self.num_classes} classes, got logits with {z.shape[1]} columns"
            )
        return _like(self._transform(z), logits)

    def fit_transform(self, val_logits: Any, val_labels: Any) -> Any:
        return self.fit(val_logits, val_labels).transform(val_logits)

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (numpy float64)."""
        return softmax(_to_numpy(self.transform(logits)), axis=1)

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def fitted_params(self) -> dict[str, Any]:
        """What was learned, JSON-serialisable (enough to restore the calibrator)."""
        if self.num_classes is None:
            raise ValueError(f"{self.name}: not fitted yet")
        return {"num_classes": self.num_classes, "n_fit": self.n_fit, **self._fitted()}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, {"calibrator": self.name, "params": self.get_params(), "fitted": self.fitted_params()})

    @classmethod
    def load(cls, path: str | Path) -> "Calibrator":
        cal = load_calibrator(path)
        if not isinstance(cal, cls):
            raise ValueError(f"{path} holds a '{cal.name}' calibrator, not '{cls.name}'")
        return cal

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        state = "fitted" if self.num_classes is not None else "not fitted"
        return f"{type(self).__name__}({args}) [{state}]"

    # -------------------------------------------------------------- subclass hooks
    def _min_samples(self, k: int) -> int:
        return self.min_samples

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _transform(self, logits: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fitted(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _restore(self, fitted: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------------- validation
    def _logits(self, x: Any, where: str) -> np.ndarray:
        z = _to_numpy(x).astype(np.float64, copy=False)
        if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
            raise ValueError(f"{self.name}.{where}: logits must have shape (N, K) with N >= 1, K >= 2; got {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError(f"{self.name}.{where}: logits contain NaN or infinite values")
        return z

    def _labels(self, y: Any, shape: tuple[int, int], where: str) -> np.ndarray:
        y = _to_numpy(y)
        if y.ndim == 2 and y.shape[1] == 1:  # MedMNIST stores labels as (N, 1)
            y = y[:, 0]
        if y.shape != (shape[0],):
            raise ValueError(f"{self.name}.{where}: labels must have shape ({shape[0]},), got {y.shape}")
        if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"{self.name}.{where}: labels must be integers")
        y = y.astype(np.int64)
        if y.size and (y.min() < 0 or y.max() >= shape[1]):
            raise ValueError(f"{self.name}.{where}: labels must lie in [0, {shape[1] - 1}], got [{y.min()}, {y.max()}]")
        return y


# --------------------------------------------------------------------------- temperature scaling
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
        self.temperature: float | None = None
        self.nll_before = self.nll_after = math.nan

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        lo, hi = math.log(self.t_min), math.log(self.t_max)
        res = minimize_scalar(
            lambda log_t: _nll(logits / math.exp(log_t), labels), bounds=(lo, hi), method="bounded",
            options={"xatol": 1e-9},
        )
        log_t = float(res.x)
        self.nll_before = _nll(logits, labels)
        self.nll_after = _nll(logits / math.exp(log_t), labels)
        if self.nll_after > self.nll_before:  # never worse than doing nothing
            log_t, self.nll_after = 0.0, self.nll_before
        if min(log_t - lo, hi - log_t) < 1e-3:
            warnings.warn(
                f"{self.name}: the fitted temperature {math.exp(log_t):.4g} is at the search bound "
                f"[{self.t_min}, {self.t_max}]; the validation set may be separable or too small",
                stacklevel=3,
            )
        self.temperature = math.exp(log_t)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return logits / self.temperature

    def _fitted(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "nll_before": self.nll_before, "nll_after": self.nll_after}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.temperature = float(fitted["temperature"])
        self.nll_before = float(fitted.get("nll_before", math.nan))
        self.nll_after = float(fitted.get("nll_after", math.nan))


class ZeroShotTemperature(TemperatureScaling):
    """A temperature fitted on one dataset's (zero-shot) logits, saved, and reused on another.

    The temperature does not depend on K, so ``transform`` accepts any number of classes.
    ``fit(..., source="dataset name")`` records where it came from.
    """

    name = "zs-ts"
    check_num_classes = False

    def __init__(self, t_min: float = 1e-3, t_max: float = 1e3) -> None:
        super().__init__(t_min, t_max)
        self.source: str | None = None

    def fit(self, val_logits: Any, val_labels: Any, *, source: str | None = None) -> "ZeroShotTemperature":
        super().fit(val_logits, val_labels)
        self.source = source
        return self

    def _fitted(self) -> dict[str, Any]:
        return {**super()._fitted(), "source": self.source}

    def _restore(self, fitted: dict[str, Any]) -> None:
        super()._restore(fitted)
        self.source = fitted.get("source")


# --------------------------------------------------------------------------- vector scaling
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
        self.w: np.ndarray | None = None
        self.b: np.ndarray | None = None

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
        self.w, self.b = theta[:k].copy(), theta[k:].copy()

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return logits * self.w + self.b

    def _fitted(self) -> dict[str, Any]:
        return {"w": self.w.tolist(), "b": self.b.tolist()}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.w, self.b = np.asarray(fitted["w"], float), np.asarray(fitted["b"], float)


# --------------------------------------------------------------------------- binning calibrators
def _log_of(probs: np.ndarray) -> np.ndarray:
    """Log-probabilities of rows renormalised to sum 1; softmax of the result gives the rows back."""
    probs = np.clip(probs, _PROB_FLOOR, None)
    return np.log(probs / probs.sum(axis=1, keepdims=True))


def _renormalise(calibrated: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1; a row that is all zero keeps the uncalibrated probabilities."""
    total = calibrated.sum(axis=1, keepdims=True)
    return np.where(total > 0, calibrated / np.where(total > 0, total, 1.0), original)


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
        self.values: list[list[float | None]] | None = None  # per column (1 for top-label, K for one-vs-rest)
        self.counts: list[list[int]] | None = None

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
        table = np.array([np.nan if v is None else v for v in self.values[column]])
        mapped = table[self._bin(p)]
        return np.where(np.isnan(mapped), p, mapped)

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        probs = softmax(logits, axis=1)
        if self.mode == "top-label":
            fitted = [self._fit_column(probs.max(1), probs.argmax(1) == labels)]
        else:
            fitted = [self._fit_column(probs[:, k], labels == k) for k in range(probs.shape[1])]
        self.values = [v for v, _ in fitted]
        self.counts = [c for _, c in fitted]

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
        return {"edges": np.linspace(0.0, 1.0, self.n_bins + 1).tolist(), "values": self.values, "counts": self.counts}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.values, self.counts = fitted["values"], fitted["counts"]


class IsotonicCalibration(Calibrator):
    """Isotonic regression of 1[y = k] on p_k for each class k (one-vs-rest), then renormalised.

    Fitted with sklearn's IsotonicRegression (out-of-bounds clipped); the fitted step functions are
    stored as thresholds and applied by linear interpolation, exactly as sklearn predicts.
    """

    name = "iso"

    def __init__(self) -> None:
        super().__init__()
        self.thresholds: list[dict[str, list[float]]] | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.isotonic import IsotonicRegression

        probs = softmax(logits, axis=1)
        self.thresholds = []
        for k in range(probs.shape[1]):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs[:, k], labels == k)
            self.thresholds.append({"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits, axis=1)
        cal = np.stack([np.interp(probs[:, k], t["x"], t["y"]) for k, t in enumerate(self.thresholds)], axis=1)
        return _log_of(_renormalise(cal, probs))

    def _fitted(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds}

    def _restore(self, fitted: dict[str, Any]) -> None:
        self.thresholds = fitted["thresholds"]


# --------------------------------------------------------------------------- registry
CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls for cls in (TemperatureScaling, ZeroShotTemperature, VectorScaling, HistogramBinning, IsotonicCalibration)
}


def get_calibrator(name: str, **params: Any) -> Calibrator:
    """A new, unfitted calibrator. Unknown names or parameters raise ValueError naming the valid ones."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; valid names: {', '.join(CALIBRATORS)}")
    cls = CALIBRATORS[key]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"calibrator '{key}' has no parameter {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or 'none'}"
        )
    return cls(**params)


def load_calibrator(path: str | Path) -> Calibrator:
    """A fitted calibrator restored from a JSON file written by ``Calibrator.save``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        cal = get_calibrator(data["calibrator"], **data.get("params", {}))
        fitted = data["fitted"]
        cal.num_classes, cal.n_fit = int(fitted["num_classes"]), int(fitted.get("n_fit", 0))
        cal._restore(fitted)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a saved calibrator file (missing or malformed {err})") from None
    return cal


__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "HistogramBinning",
    "IsotonicCalibration",
    "TemperatureScaling",
    "VectorScaling",
    "ZeroShotTemperature",
    "get_calibrator",
    "load_calibrator",
]
