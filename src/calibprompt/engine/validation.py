"""Fit a config's method exactly as ``calibprompt.engine.run.run`` does and score it on the validation
shots only. This is what tuning optimises; the test split cannot reach it:

* the few-shot split is made, and only its ``train`` and ``val`` parts are kept, inside a
  :class:`FitView` -- a dataset view that raises :class:`TestSplitAccess` for any other image;
* everything downstream (feature cache, encoder, trainer, metrics) receives only that view and those
  samples, so no test image is ever encoded and no test label or prediction enters the objective.

(Opening the dataset and making the split still *list* and hash every file, as they must in order to
hold the test part out; that is the only contact with test images.)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from calibprompt.config import config_hash, resolve
from calibprompt.engine import pipeline
from calibprompt.features import FeatureCache


class TestSplitAccess(RuntimeError):
    """Something asked a validation-only view for an image outside the train and val shots."""

    __test__ = False  # not a pytest test class


class FitView:
    """The train and val parts of a split, as a dataset the feature cache can read. Any image outside
    them (i.e. the test split) raises :class:`TestSplitAccess`."""

    def __init__(self, dataset, train: Sequence, val: Sequence):
        self.name = dataset.name
        self.classnames = list(dataset.classnames)
        self.template = dataset.template
        self.train = list(train)
        self.val = list(val)
        self._allowed = frozenset(s.ref for s in self.train + self.val)
        self._dataset = dataset

    def _check(self, sample) -> None:
        ref = getattr(sample, "ref", sample)
        if ref not in self._allowed:
            raise TestSplitAccess(f"validation-only view of {self.name!r} was asked for {ref!r}, which is not "
                                  "one of the training or validation shots")

    def load(self, sample):
        self._check(sample)
        return self._dataset.load(sample)

    def content_hash(self, sample) -> str:
        self._check(sample)
        return self._dataset.content_hash(sample)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def fit_view(resolved: dict) -> FitView:
    """Open the dataset of a resolved config, make its split and keep only the train and val parts."""
    dataset, split = pipeline.open_split(resolved)
    return FitView(dataset, split.samples_for("train"), split.samples_for("val"))


def check_tunable(resolved: dict) -> None:
    method = resolved["resolved_method"]
    if int(resolved["val_shots"]) < 1 and not resolved.get("split_file"):
        raise ValueError("tuning scores prompts on held-out validation shots: set val_shots >= 1 "
                         "(e.g. --val-shots 4, or base: {val_shots: 4} in the grid)")
    if not method["trains"]:
        raise ValueError(f"method {method['name']!r} trains nothing; there is nothing to tune")
    if method["posthoc"]:
        raise ValueError(f"method {method['name']!r} fits a post-hoc calibrator on the validation shots, "
                         "so they cannot also score it; tune the method without the '+' suffix")
    if pipeline.build_method(resolved).needs_validation():
        raise ValueError(f"method {method['name']!r} selects its hyper-parameters on the validation shots, which "
                         "tuning keeps for scoring; give them explicitly (e.g. method.C for linear-probe)")


def validation_metrics(cfg: dict, cache: FeatureCache | None = None, return_head: bool = False) -> dict[str, Any]:
    """Fit ``cfg`` (the same stages, seed and data as ``run``) and return its metrics on the validation
    shots: ``{"metrics": {...}, "n_train", "n_val", "config_hash", "seed"}`` (+ ``"head"``
    on request). The loaded backbone is
    reused across calls (``pipeline.loaded_backbone``)."""
    from calibprompt.metrics import calibration_metrics

    resolved = resolve(cfg)
    check_tunable(resolved)
    device = pipeline.resolve_device(resolved["device"])
    view = fit_view(resolved)
    if not view.val:
        raise ValueError("the split has no validation shots (set val_shots >= 1)")
    backbone = pipeline.loaded_backbone(resolved["backbone"], device)
    cache = pipeline.feature_cache(cache, resolved)
    method = pipeline.build_method(resolved)
    feats = pipeline.encode(cache, backbone, view, method, resolved, [view.val], view.train, True, False)
    (val_feats,) = feats.evals
    # The method sees no validation shots here: they are what it is scored on.
    fitted = pipeline.fit(method, backbone, view, resolved, view.train, feats.train_views, None, device)
    logits = pipeline.logits(fitted.head.to(device), val_feats, None, int(resolved["eval"]["batch_size"]))
    val_labels = np.array([s.label for s in view.val])
    metrics = calibration_metrics(logits.double().numpy(), val_labels, n_bins=int(resolved["eval"]["n_bins"]),
                                  convention="standard")
    out = {"metrics": metrics, "n_train": len(view.train), "n_val": len(view.val),
           "config_hash": config_hash(resolved), "seed": int(resolved["seed"])}
    if return_head:
        out["head"] = fitted.head.cpu()
    return out
