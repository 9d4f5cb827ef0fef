"""The stages of a run, written once: split -> backbone -> features -> method.fit -> post-hoc -> logits.

``calibprompt.engine.run.run`` chains them and writes the run folder; ``engine.validation`` chains the
same stages with the validation shots as the evaluated set (tuning); the benchmark and the demo call
them too. Each stage is a function of the resolved config and what earlier stages returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from calibprompt.features import FeatureCache
from calibprompt.methods import FitContext, FitResult, Method, load_head
from calibprompt.settings import sha256_json


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device: cpu")
    return torch.device(name)


def open_split(resolved: dict):
    """(dataset, split) of a resolved config: the saved split file, or a fresh deterministic split."""
    from calibprompt.data import FewShotSplit, make_split, open_dataset

    dataset = open_dataset(resolved["data"])
    if resolved.get("split_file") and str(resolved["split_file"]).endswith(".pkl"):
        from calibprompt.data.official import import_official_split  # the official code's split pickle

        split = import_official_split(resolved["split_file"], dataset)
    elif resolved.get("split_file"):
        split = FewShotSplit.from_json(resolved["split_file"], dataset)
    else:
        split = make_split(dataset, shots=int(resolved["shots"]), seed=int(resolved["seed"]),
                           val_shots=int(resolved["val_shots"]), by=resolved.get("split_by", "pixels"))
    return dataset, split


_LAST_BACKBONE: dict = {}


def loaded_backbone(backbone_cfg: dict, device: torch.device):
    """The configured backbone, reusing the one the previous run in this process loaded when its config
    and weight files are the same (sweeps, tuning and the demo run many configs on one model; frozen
    weights make the reuse safe; files are re-checked by size and mtime)."""
    from calibprompt.backbones import load_backbone

    key = sha256_json({"cfg": backbone_cfg, "device": str(device), "files": _file_stamps(backbone_cfg)})
    if _LAST_BACKBONE.get("key") != key:
        _LAST_BACKBONE.clear()  # drop the old model before loading the next one
        _LAST_BACKBONE.update(key=key, model=load_backbone(backbone_cfg).to(device))
    return _LAST_BACKBONE["model"]


def _file_stamps(backbone_cfg: dict) -> list:
    path = backbone_cfg.get("path")
    if not path or not Path(path).exists():
        return []
    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).iterdir())
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def feature_cache(cache: FeatureCache | None, resolved: dict) -> FeatureCache:
    """The feature cache of a run: ``cache`` (a sweep worker's shared one) at the precision the run's
    ``encode.amp`` asks for, or a new one from the run's ``cache_dir`` and ``encode`` settings."""
    if cache is None:
        return FeatureCache(resolved.get("cache_dir"), **resolved["encode"])
    return cache.with_amp(resolved["encode"].get("amp", "none"))


def build_method(resolved: dict) -> Method:
    """The Method object of a resolved config's ``resolved_method`` section."""
    rm = resolved["resolved_method"]
    from calibprompt.methods import METHODS

    return METHODS[rm["kind"]](losses=rm["losses"], **rm["params"])


def augment_views(train_cfg: dict) -> int | None:
    """Augmented training views of a resolved ``train:`` section (None: no augmentation)."""
    return int(train_cfg["n_views"] or train_cfg["epochs"]) if train_cfg["augment"] else None


@dataclass
class Features:
    """Cached features of one run: one tensor per evaluated set, and the training views (N, V, D)."""

    evals: list[torch.Tensor]
    train_views: torch.Tensor


def encode(cache: FeatureCache, backbone, dataset, method: Method, resolved: dict, eval_sets: Sequence[Sequence],
           train: Sequence, fits: bool, progress: bool) -> Features:
    """Every feature the run needs, in one encoder stream (one padded batch)."""
    views = augment_views(resolved["train"]) if method.train_views in ("augmented", "noisy") else None
    noise = None
    if method.train_views == "noisy":  # PromptSmooth: Gaussian pixel noise on every training view
        tr = resolved["train"]
        noise = method.train_noise(int(tr["n_views"] or tr["epochs"]))
    needs_train = fits and method.train_views != "none"
    if views is not None and needs_train and len(train):
        warn_small_crops(dataset, train[0], backbone.preprocess.crop_scale[0])
    evals, train_views = cache.run_features(backbone, dataset, list(eval_sets), train if needs_train else (),
                                            n_views=views, aug_seed=int(resolved["train"]["aug_seed"]),
                                            progress=progress, train_noise=noise)
    return Features(evals, train_views)


MIN_CROP_SIDE = 32  # pixels: below this a random crop holds too little of the image to learn from


def warn_small_crops(dataset, sample, min_scale: float) -> None:
    """Random-resized crops keep as little as ``min_scale`` of an image's area: on small images (28-pixel
    MedMNIST) that is a few pixels, and prompts tuned on such crops are badly underconfident on whole
    images (docs/demo.md measured ECE ~30% on the micro model). Say so, and what to change."""
    import math

    from calibprompt.progress import note

    width, height = dataset.load(sample).size
    side = math.sqrt(min_scale) * min(width, height)
    if side < MIN_CROP_SIDE:
        note(f"training augmentation: random crops keep down to {min_scale:.0%} of the area of these "
             f"{width}x{height} images, about {side:.0f}x{side:.0f} pixels, too little to learn from; prompts "
             "tuned on them tend to be underconfident on whole images. Set train.augment: false (or use "
             "larger images).")


@torch.no_grad()
def zero_shot_text(backbone, classnames: list[str], template: str, normalize: bool = True) -> torch.Tensor:
    """(K, E) features of the hand-written prompts ``template.format(classname)`` (L2-normalised unless
    ``normalize=False``)."""
    ids = backbone.tokenize([template.format(c.replace("_", " ")) for c in classnames])
    device = next(backbone.parameters()).device
    raw = backbone.encode_text(ids.to(device)).float()
    return F.normalize(raw, dim=-1) if normalize else raw


def fit(method: Method, backbone, dataset, resolved: dict, train_s: Sequence, train_views: torch.Tensor,
        val: tuple[torch.Tensor, Sequence] | None, device: torch.device, progress: bool = False,
        head_from: str | Path | None = None) -> FitResult:
    """Fit ``method`` on the training shots (or restore it from ``head_from``) and return its head."""
    return fit_method(method, fit_context(backbone, dataset, resolved, train_s, train_views, val, device, progress),
                      head_from)


def fit_method(method: Method, ctx: FitContext, head_from: str | Path | None = None) -> FitResult:
    """:func:`fit` from a built :func:`fit_context` (the global torch seed set to the run's first)."""
    if head_from is not None:
        return restore(method, ctx, head_from)
    torch.manual_seed(int(ctx.seed))
    return method.fit(ctx)


def fit_context(backbone, dataset, resolved: dict, train_s: Sequence, train_views: torch.Tensor,
                val: tuple[torch.Tensor, Sequence] | None, device: torch.device, progress: bool = False) -> FitContext:
    """What a method's ``fit`` sees: the training views and labels, zero-shot text, settings, validation."""
    zs_raw = zero_shot_text(backbone, dataset.classnames, dataset.template, normalize=False)
    return FitContext(
        backbone=backbone, classnames=list(dataset.classnames), train_views=train_views,
        labels=torch.tensor([s.label for s in train_s], dtype=torch.long),
        zs_text=F.normalize(zs_raw, dim=-1), zs_text_raw=zs_raw,
        scale=float(backbone.logit_scale.float()), seed=int(resolved["seed"]), device=device,
        train_cfg=resolved["train"], prompt_cfg=resolved["prompt"],
        val_features=val[0] if val else None,
        val_labels=torch.tensor([s.label for s in val[1]], dtype=torch.long) if val else None,
        progress=progress,
    )


def restore(method: Method, ctx: FitContext, path: str | Path) -> FitResult:
    """A saved head (``head.safetensors`` of any run) or CoOp context vectors (``prompt.safetensors``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            is_head = (handle.metadata() or {}).get("format", "").startswith("calibprompt.head")
    except Exception as err:  # noqa: BLE001 - missing, truncated or not safetensors: name the file
        raise ValueError(f"{path} is not a readable head or prompt file ({err}); use the head.safetensors or "
                         "prompt.safetensors of a finished run") from None
    if is_head:
        head, meta = load_head(path, num_classes=ctx.num_classes, feature_dim=int(ctx.zs_text.shape[1]))
        check_head_meta(meta, ctx, path)
        return FitResult(head, {"head_from": str(path)})
    if not hasattr(method, "from_prompt"):
        raise ValueError(f"{path} holds context vectors, which only prompt-learning methods use; method "
                         f"{method.name!r} needs a head.safetensors file")
    return method.from_prompt(ctx, path)


def check_head_meta(meta: dict, ctx: FitContext, path: str | Path) -> None:
    """A saved head belongs to one class list (in order) and one backbone: refuse it elsewhere."""
    names = meta.get("classnames")
    if names is not None and [n.replace("_", " ") for n in names] != [c.replace("_", " ") for c in ctx.classnames]:
        raise ValueError(f"{path} was fitted for the classes {names}; this dataset has {ctx.classnames} "
                         "(names and order must match)")
    fingerprint = meta.get("backbone_fingerprint")
    if fingerprint is not None and ctx.backbone is not None and fingerprint != ctx.backbone.fingerprint():
        raise ValueError(f"{path} was fitted on another backbone (weights fingerprint {fingerprint[:12]}, this one "
                         f"{ctx.backbone.fingerprint()[:12]}); use the backbone it was fitted on")


def fit_posthoc(name: str | None, head, val_feats: torch.Tensor | None, val_s: Sequence):
    """(calibrator or None, what the run records) for the resolved ``posthoc`` name."""
    if not name:
        return None, None
    from calibprompt.calibration import get_calibrator

    import warnings

    val_logits = logits(head, val_feats)
    labels = np.array([s.label for s in val_s])
    with warnings.catch_warnings():  # a temperature at its bound becomes a run flag that names the run
        warnings.simplefilter("ignore")
        calibrator = get_calibrator(name).fit(val_logits.numpy(), labels)
    return calibrator, {"name": name, "params": calibrator.fitted_params(), "n_val": len(val_s),
                        "state": calibrator.to_dict()}


def fit_decisions(resolved: dict, head, calibrator, val_feats: torch.Tensor | None, val_s: Sequence, dataset,
                  batch_size: int = 100):
    """(conformal predictor or None, selective threshold or None) of the resolved ``conformal:`` and
    ``selective:`` sections, fitted on the validation shots' calibrated probabilities."""
    from calibprompt.calibration.conformal import ConformalPredictor, uniform_from_keys
    from calibprompt.calibration.selective import SelectiveThreshold

    cp_cfg, sel_cfg = resolved.get("conformal") or {}, resolved.get("selective") or {}
    if cp_cfg.get("alpha") is None and sel_cfg.get("target_risk") is None:
        return None, None
    probs = torch.softmax(logits(head, val_feats, calibrator, batch_size).double(), dim=1).numpy()
    labels = np.array([s.label for s in val_s])
    conformal = selective = None
    if cp_cfg.get("alpha") is not None:
        conformal = ConformalPredictor(float(cp_cfg["alpha"]), cp_cfg["score"], float(cp_cfg["lambda"]),
                                       int(cp_cfg["k_reg"]), bool(cp_cfg.get("randomized", True)),
                                       bool(cp_cfg.get("by_class", False)))
        conformal.fit(probs, labels, uniform_from_keys([dataset.pixel_hash(s) for s in val_s])
                      if conformal.uses_u else None)
    if sel_cfg.get("target_risk") is not None:
        selective = SelectiveThreshold(float(sel_cfg["target_risk"])).fit(probs, labels)
    return conformal, selective


def decide(probs: np.ndarray, conformal=None, selective=None, dataset=None, samples: Sequence = ()
           ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(prediction sets (N, K) or None, abstain flags (N,) or None) of the calibrated probabilities of
    ``samples``; randomised APS/RAPS draw each image's u from its pixel hash in ``dataset`` (decoded only then)."""
    from calibprompt.calibration.conformal import uniform_from_keys

    sets = None
    if conformal is not None:
        u = uniform_from_keys([dataset.pixel_hash(s) for s in samples]) if conformal.uses_u else None
        sets = conformal.predict_sets(probs, u)
    return sets, (selective.abstain(probs) if selective is not None else None)


@torch.no_grad()
def logits(head, feats: torch.Tensor, calibrator: Any = None, batch_size: int = 100) -> torch.Tensor:
    """Head logits of cached features in batches (test batch 100 as in the paper), then the calibrator."""
    device = next(head.parameters()).device
    out = torch.cat([head(feats[i : i + batch_size].to(device)).cpu() for i in range(0, feats.shape[0], batch_size)]) \
        if feats.shape[0] else torch.empty(0, head.num_classes)
    if calibrator is not None:
        out = torch.as_tensor(calibrator.transform(out.numpy()))
    return out

