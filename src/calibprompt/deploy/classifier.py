"""A scikit-learn-style estimator around the whole pipeline: fit prompts (or any method) on labelled
images, then predict calibrated probabilities, classes and conformal prediction sets.

    clf = CalibPromptClassifier(backbone="micro-medmnist", method="calibprompt", shots=8, val_shots=50,
                                classnames=["normal", "pneumonia"], conformal_alpha=0.1)
    clf.fit(images, labels)            # images: uint8 array (N, H, W[, 3]) or image file paths
    clf.predict_proba(new_images)      # (N, K), columns in the order of clf.classes_
    clf.predict_set(new_images)        # (N, K) booleans: the conformal set at conformal_alpha

From the labelled images, ``val_shots`` per class (drawn with ``seed``) are held out as calibration
data (post-hoc calibrator, conformal threshold, abstention threshold), then ``shots`` per class (all
the rest when None) train the method. ``save``/``load`` use the exported-model format of
``calibprompt export`` (docs/deploy.md), so ``calibprompt predict`` reads a saved classifier too.

Not a feature-matrix estimator: inputs are images, so the generic ``check_estimator`` suite (random
2-D float matrices) does not apply; docs/deploy.md lists the checks that do and pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError


class CalibPromptClassifier(ClassifierMixin, BaseEstimator):
    """Few-shot classifier on a frozen Med-VLM, calibrated and with conformal sets (see module docs).

    ``backbone``: a registry name (``calibprompt models``), a local model folder or file, or a
    ``backbone:`` config dict. ``method``: a method preset (``calibprompt methods``) with its parameters
    in ``method_params``; ``train``: overrides of the ``train:`` config section (e.g. ``{"epochs": 20}``).
    ``posthoc``: a post-hoc calibrator name fitted on the held-out shots (e.g. ``"ts"``).
    ``conformal_alpha``/``conformal_score``/``conformal_by_class``: split conformal sets (docs/deploy.md);
    ``target_risk``: abstention threshold."""

    def __init__(self, backbone: Any = "micro-medmnist", method: str = "calibprompt", shots: int | None = None,
                 val_shots: int = 0, classnames: list[str] | None = None, template: str = "a photo of a {}.",
                 method_params: dict | None = None, train: dict | None = None, posthoc: str | None = None,
                 conformal_alpha: float | None = None, conformal_score: str = "aps", conformal_by_class: bool = False,
                 target_risk: float | None = None,
                 seed: int = 1, device: str = "cpu", cache_dir: str | None = None, quiet: bool = True):
        self.backbone = backbone
        self.method = method
        self.shots = shots
        self.val_shots = val_shots
        self.classnames = classnames
        self.template = template
        self.method_params = method_params
        self.train = train
        self.posthoc = posthoc
        self.conformal_alpha = conformal_alpha
        self.conformal_score = conformal_score
        self.conformal_by_class = conformal_by_class
        self.target_risk = target_risk
        self.seed = seed
        self.device = device
        self.cache_dir = cache_dir
        self.quiet = quiet

    # ---- fitting ----------------------------------------------------------------------------------
    def fit(self, X, y) -> "CalibPromptClassifier":
        """Hold out ``val_shots`` per class, train the method on ``shots`` per class, fit the calibrator and
        the decision thresholds on the held-out images. Returns self."""
        from calibprompt.deploy.model import DeployedModel
        from calibprompt.deploy.predict import probabilities
        from calibprompt.engine import pipeline

        y = np.asarray(y)
        if y.ndim != 1 or len(y) != _length(X):
            raise ValueError(f"y must be one label per image: got {y.shape} labels for {_length(X)} images")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"fit needs images of at least two classes, got only {self.classes_.tolist()}")
        names = list(self.classnames) if self.classnames is not None else [str(c) for c in self.classes_]
        if len(names) != len(self.classes_):
            raise ValueError(f"classnames has {len(names)} names for {len(self.classes_)} classes "
                             f"{self.classes_.tolist()} (in sorted order)")
        dataset = _dataset(X, y_index, names, self.template, "train")
        train_s, val_s = self._select(dataset.samples, y_index, names)
        resolved = self._resolved(names)
        device = pipeline.resolve_device(self.device)
        backbone = pipeline.loaded_backbone(resolved["backbone"], device)
        method = pipeline.build_method(resolved)
        cache = self._cache()
        feats = pipeline.encode(cache, backbone, dataset, method, resolved, [val_s], train_s, True, not self.quiet)
        val_feats = feats.evals[0]
        fitted = pipeline.fit(method, backbone, dataset, resolved, train_s, feats.train_views,
                              (val_feats, val_s) if val_s else None, device, progress=not self.quiet)
        head = fitted.head.to(device)
        calibrator, _ = pipeline.fit_posthoc(resolved["resolved_method"]["posthoc"], head, val_feats, val_s)
        conformal, selective = pipeline.fit_decisions(resolved, head, calibrator, val_feats, val_s, dataset)
        self.model_ = DeployedModel(head=head.cpu(), classnames=names, template=self.template,
                                    backbone=resolved["backbone"], backbone_fingerprint=backbone.fingerprint(),
                                    calibrator=calibrator, conformal=conformal, selective=selective, config=resolved,
                                    info={"method": resolved["resolved_method"]["name"], "classes": self.classes_.tolist(),
                                          "n_train": len(train_s), "n_calibration": len(val_s)})
        self.calibration_ = (probabilities(self.model_, val_feats) if val_s else None,
                             np.array([s.label for s in val_s]), [dataset.pixel_hash(s) for s in val_s])
        self.backbone_ = backbone
        return self

    def _select(self, samples, y_index: np.ndarray, names: list[str]):
        rng = np.random.default_rng(int(self.seed))
        train, val = [], []
        for k, name in enumerate(names):
            idx = rng.permutation(np.flatnonzero(y_index == k))
            need = int(self.val_shots) + (int(self.shots) if self.shots is not None else 1)
            if len(idx) < need:
                raise ValueError(f"class {name!r} has {len(idx)} image(s); val_shots + shots needs {need}")
            val += [samples[i] for i in idx[: self.val_shots]]
            rest = idx[self.val_shots :]
            train += [samples[i] for i in (rest[: self.shots] if self.shots is not None else rest)]
        return train, val

    def _resolved(self, names: list[str]) -> dict:
        from calibprompt.config import load_config, merge, resolve

        cfg = load_config(None)
        merge(cfg, {"backbone": _backbone_cfg(self.backbone), "data": {"source": "folder", "path": "(in memory)"},
                    "method": {"name": self.method, **(self.method_params or {})}, "train": dict(self.train or {}),
                    "posthoc": self.posthoc, "seed": int(self.seed), "shots": int(self.shots or 1),
                    "val_shots": int(self.val_shots), "device": self.device, "cache_dir": self.cache_dir,
                    "conformal": {"alpha": self.conformal_alpha, "score": self.conformal_score,
                                  "by_class": bool(self.conformal_by_class)},
                    "selective": {"target_risk": self.target_risk}}, "CalibPromptClassifier")
        return resolve(cfg)

    def _cache(self):
        from calibprompt.features import FeatureCache

        return FeatureCache(self.cache_dir)

    # ---- prediction ---------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("This CalibPromptClassifier is not fitted yet: call fit(images, labels) or "
                                 "CalibPromptClassifier.load(path)")

    def predict_proba(self, X) -> np.ndarray:
        """(N, K) calibrated class probabilities, columns in the order of ``classes_``."""
        return self._proba(X)[0]

    def _proba(self, X):
        """(probabilities, the dataset of ``X``)."""
        from calibprompt.deploy.predict import check_backbone, probabilities

        self._check_fitted()
        backbone = self._backbone()
        check_backbone(self.model_, backbone)
        dataset = _dataset(X, np.zeros(_length(X), dtype=np.int64), self.model_.classnames, self.model_.template, "test")
        feats = self._cache().features(backbone, dataset, dataset.samples, progress=not self.quiet)
        return probabilities(self.model_, feats), dataset

    def predict(self, X) -> np.ndarray:
        """The class of highest calibrated probability, as a label of ``classes_``."""
        self._check_fitted()
        return self.classes_[self.predict_proba(X).argmax(1)]

    def predict_set(self, X, alpha: float | None = None) -> np.ndarray:
        """(N, K) booleans: the conformal prediction set of each image at level ``alpha`` (default: the
        fitted ``conformal_alpha``; another alpha is calibrated again on the held-out images)."""
        from calibprompt.calibration.conformal import ConformalPredictor, uniform_from_keys
        from calibprompt.engine.pipeline import decide

        self._check_fitted()
        conformal = self.model_.conformal
        if alpha is not None and (conformal is None or float(alpha) != conformal.alpha):
            probs, labels, keys = getattr(self, "calibration_", (None, None, None))
            if probs is None:
                raise ValueError("predict_set(alpha=...) calibrates on the held-out images: fit with val_shots > 0 "
                                 "(a loaded model can only use its exported alpha)")
            conformal = ConformalPredictor(float(alpha), self.conformal_score, by_class=bool(self.conformal_by_class))
            conformal.fit(probs, labels, uniform_from_keys(keys))
        if conformal is None:
            raise ValueError("no conformal threshold: fit with conformal_alpha (and val_shots), or pass alpha")
        probs, dataset = self._proba(X)
        return decide(probs, conformal, None, dataset, dataset.samples)[0]

    # ---- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted classifier as an exported model (``calibprompt predict`` reads it)."""
        self._check_fitted()
        return self.model_.save(path)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", cache_dir: str | None = None) -> "CalibPromptClassifier":
        """A classifier ready to predict from a file of ``save`` or ``calibprompt export``."""
        from calibprompt.deploy.model import load_model

        model = load_model(path)
        conformal = model.conformal
        clf = cls(backbone=model.backbone, method=str(model.info.get("method") or "calibprompt"),
                  classnames=model.classnames, template=model.template, device=device, cache_dir=cache_dir,
                  conformal_alpha=conformal.alpha if conformal else None,
                  conformal_score=conformal.score if conformal else "aps",
                  conformal_by_class=conformal.by_class if conformal else False,
                  target_risk=model.selective.target_risk if model.selective else None)
        clf.model_ = model
        clf.classes_ = np.asarray(model.info.get("classes") or list(range(len(model.classnames))))
        return clf

    def _backbone(self):
        from calibprompt.engine import pipeline

        if getattr(self, "backbone_", None) is None:
            self.backbone_ = pipeline.loaded_backbone(self.model_.backbone, pipeline.resolve_device(self.device))
        return self.backbone_


def _backbone_cfg(backbone: Any) -> dict:
    if isinstance(backbone, dict):
        return dict(backbone)
    if isinstance(backbone, (str, Path)) and Path(backbone).expanduser().exists():
        return {"path": str(Path(backbone).expanduser())}
    if isinstance(backbone, str):
        return {"name": backbone}
    raise ValueError(f"backbone must be a registry name, a model path or a backbone config dict, got {backbone!r}")


def _length(X) -> int:
    return int(X.shape[0]) if isinstance(X, np.ndarray) else len(X)


def _dataset(X, y_index: np.ndarray, names: list[str], template: str, split: str):
    """An in-memory dataset: a uint8 image array (N, H, W[, C]) or a list of image file paths."""
    if isinstance(X, np.ndarray):
        from calibprompt.data.medmnist import ArrayDataset

        if X.ndim not in (3, 4) or X.shape[0] == 0:
            raise ValueError(f"X must be images (N, H, W) or (N, H, W, C), got an array of shape {X.shape}")
        return ArrayDataset("in-memory", names, template, {split: X}, {split: np.asarray(y_index)},
                            location="in-memory")
    from calibprompt.deploy.predict import files_dataset

    return files_dataset([Path(p).expanduser().resolve() for p in X], names, template, labels=y_index, split=split,
                         unique_refs=True, where="CalibPromptClassifier")
