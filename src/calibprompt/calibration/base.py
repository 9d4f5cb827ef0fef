"""The Calibrator base class (input validation, fit/transform plumbing, JSON save and load) and the
registry. ``transform`` returns logits: scaled logits for the scaling calibrators, log-probabilities for
the binning ones, so softmax of the output is the calibrated probability in every case. Inputs may be
numpy arrays or torch tensors; the output is float64 of the same kind (a torch output lives on the
input's device). The calibrators themselves: ``calibprompt.calibration`` (a table of all five)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.base import BaseEstimator

from calibprompt.settings import atomic_write_json, registrar



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


class Calibrator(BaseEstimator):
    """Base class: input validation, fit/transform plumbing, JSON save and load."""

    name: ClassVar[str] = ""
    preserves_argmax: ClassVar[bool] = False
    min_samples: ClassVar[int] = 10
    check_num_classes: ClassVar[bool] = True
    #: may follow a method name as "+name" (fitted on the run's validation shots)
    as_suffix: ClassVar[bool] = True

    def __init__(self) -> None:
        self.num_classes_: int | None = None
        self.n_fit_: int = 0

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
        self.num_classes_ = logits.shape[1]
        self.n_fit_ = len(labels)
        self._fit(logits, labels)
        return self

    def transform(self, logits: Any) -> Any:
        if self.num_classes_ is None:
            raise ValueError(f"{self.name}: call fit(val_logits, val_labels) (or load a saved one) before transform")
        z = self._logits(logits, "transform")
        if self.check_num_classes and z.shape[1] != self.num_classes_:
            raise ValueError(
                f"{self.name}.transform: fitted on K={self.num_classes_} classes, got logits with {z.shape[1]} columns"
            )
        return _like(self._transform(z), logits)

    def fit_transform(self, val_logits: Any, val_labels: Any) -> Any:
        return self.fit(val_logits, val_labels).transform(val_logits)

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities (numpy float64)."""
        return softmax(_to_numpy(self.transform(logits)), axis=1)

    # scikit-learn's estimator protocol: ``sklearn.base.clone``, ``set_params`` and ``check_is_fitted`` work
    # on every calibrator (constructor arguments are stored unchanged; learned attributes end in "_").
    @classmethod
    def _param_names(cls) -> list[str]:
        return [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs")]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters (``deep`` is accepted for scikit-learn; calibrators hold no estimators)."""
        return {k: getattr(self, k) for k in self._param_names()}

    @classmethod
    def _check_param_names(cls, params: dict) -> None:
        valid = cls._param_names()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"calibrator '{cls.name}' has no parameter {', '.join(map(repr, unknown))}; "
                             f"valid parameters: {', '.join(valid) or 'none'}")

    def set_params(self, **params: Any) -> "Calibrator":
        """Change constructor parameters; fitted state is dropped. The new parameters are validated by
        the constructor first, so a bad value leaves the calibrator as it was."""
        self._check_param_names(params)
        fresh = type(self)(**{**self.get_params(), **params})
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return self.num_classes_ is not None

    def fitted_params(self) -> dict[str, Any]:
        """What was learned, JSON-serialisable (enough to restore the calibrator)."""
        if self.num_classes_ is None:
            raise ValueError(f"{self.name}: not fitted yet")
        return {"num_classes": self.num_classes_, "n_fit": self.n_fit_, **self._fitted()}

    def to_dict(self) -> dict[str, Any]:
        """Name, constructor parameters and what was learned: :func:`calibrator_from_dict` restores it."""
        return {"calibrator": self.name, "params": self.get_params(), "fitted": self.fitted_params()}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Calibrator":
        cal = load_calibrator(path)
        if not isinstance(cal, cls):
            raise ValueError(f"{path} holds a '{cal.name}' calibrator, not '{cls.name}'")
        return cal

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        state = "fitted" if self.num_classes_ is not None else "not fitted"
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


# --------------------------------------------------------------------------- registry
CALIBRATORS: dict[str, type[Calibrator]] = {}
register_calibrator = registrar(CALIBRATORS, "calibrator")


def get_calibrator(name: str, **params: Any) -> Calibrator:
    """A new, unfitted calibrator. Unknown names or parameters raise ValueError naming the valid ones."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in CALIBRATORS:
        from calibprompt.plugins import load_plugins

        load_plugins()  # a plug-in package may register it
    if key not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; valid names: {', '.join(CALIBRATORS)}")
    cls = CALIBRATORS[key]
    cls._check_param_names(params)
    return cls(**params)


def load_calibrator(path: str | Path) -> Calibrator:
    """A fitted calibrator restored from a JSON file written by ``Calibrator.save``."""
    return calibrator_from_dict(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


def calibrator_from_dict(data: dict, where: str = "calibrator") -> Calibrator:
    """A fitted calibrator from :meth:`Calibrator.to_dict` output."""
    path = where
    try:
        cal = get_calibrator(data["calibrator"], **data.get("params", {}))
        fitted = data["fitted"]
        cal.num_classes_, cal.n_fit_ = int(fitted["num_classes"]), int(fitted.get("n_fit", 0))
        cal._restore(fitted)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a saved calibrator file (missing or malformed {err})") from None
    return cal


