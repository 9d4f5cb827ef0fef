"""One run end to end: data -> backbone -> cached features -> prompt tuning -> evaluation -> files.

Output folder (``metrics.json`` is written last and marks the run as finished)::

    config.yaml          resolved config
    split.json           the few-shot split (reusable with --split / split_file)
    prompt.safetensors   learned context vectors (absent for zero-shot)
    predictions.csv      per test sample: ref, label, prediction, class probabilities
    reliability.png/json reliability diagram and its data
    metrics.json         metrics (standard and reference conventions), resolved config, hash,
                         versions, seed, timings
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from calibprompt import __version__
from calibprompt.config import config_hash, dump, resolve
from calibprompt.features import FeatureCache
from calibprompt.settings import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
RESULT_FILE = "metrics.json"


class RunConflict(ValueError):
    """The output folder holds a finished run of a different configuration."""


def finished_result(out_dir: str | Path, run_hash: str | None = None) -> dict | None:
    """The finished result in ``out_dir`` (if its hash matches ``run_hash``), else None."""
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # never treat an unreadable result as done
    if result.get("status") != "done":
        return None
    if run_hash is not None and result.get("config_hash") != run_hash:
        return None
    return result


def augment_views(train_cfg: dict) -> int | None:
    """Augmented training views of a resolved ``train:`` section (None: no augmentation)."""
    return int(train_cfg["n_views"] or train_cfg["epochs"]) if train_cfg["augment"] else None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use device: cpu")
    return torch.device(name)


def run(cfg: dict, out_dir: str | Path, *, quiet: bool = False, cache: FeatureCache | None = None,
        overwrite: bool = False, ctx_from: str | Path | None = None) -> dict:
    """Execute (or reuse) the run described by ``cfg`` and write its files to ``out_dir``.

    ``ctx_from``: evaluate the context vectors saved in that file instead of training (``eval``)."""
    from calibprompt.data import FewShotSplit, make_split, open_dataset
    from calibprompt.prompts import PromptLearner
    from calibprompt.training import TrainSettings, predict_logits, train_prompts, zero_shot_text_features

    resolved = resolve(cfg)
    if ctx_from is not None:
        resolved["resolved_method"]["trains"] = False
        resolved["ctx_from"] = str(ctx_from)
    run_hash = config_hash(resolved)
    out_dir = Path(out_dir)
    done = finished_result(out_dir, run_hash)
    if done is not None:
        if not quiet:
            print(f"reusing finished run {run_hash[:12]} in {out_dir}")
        return done
    other = finished_result(out_dir)
    if other is not None and not overwrite:
        raise RunConflict(
            f"{out_dir} holds a finished run of another configuration (hash {other.get('config_hash', '?')[:12]}, "
            f"this one {run_hash[:12]}); choose another --out or pass --overwrite"
        )
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # an interrupted rerun must never look finished
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump(resolved))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    seed = int(resolved["seed"])
    torch.manual_seed(seed)
    device = resolve_device(resolved["device"])
    dataset = open_dataset(resolved["data"])
    if resolved.get("split_file"):
        split = FewShotSplit.from_json(resolved["split_file"], dataset)
    else:
        split = make_split(dataset, shots=int(resolved["shots"]), seed=seed, val_shots=int(resolved["val_shots"]))
    split.to_json(out_dir / "split.json")
    train_s, val_s, test_s = (split.samples_for(part) for part in ("train", "val", "test"))
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    backbone = _loaded_backbone(resolved["backbone"], device)
    timings["load_backbone"] = time.perf_counter() - t
    cache = cache or FeatureCache(resolved.get("cache_dir"))
    progress = not quiet
    method = resolved["resolved_method"]
    tr = resolved["train"]
    encoded_before = cache.encoded

    tunes = bool(method["trains"]) and ctx_from is None
    t = time.perf_counter()
    (test_feats, val_feats), train_views = cache.run_features(
        backbone, dataset, [test_s, val_s], train_s if tunes else (), n_views=augment_views(tr),
        aug_seed=int(tr["aug_seed"]), progress=progress)
    test_feats = test_feats.to(device)
    val_feats = val_feats.to(device) if val_s else None
    timings["features"] = time.perf_counter() - t
    scale = backbone.logit_scale.float()
    zs_text = zero_shot_text_features(backbone, dataset.classnames, dataset.template)

    train_info: dict = {}
    if method["trains"] or ctx_from is not None:
        p = resolved["prompt"]
        gen = torch.Generator().manual_seed(seed)
        learner = PromptLearner(backbone, dataset.classnames, n_ctx=int(p["n_ctx"]), init=p["init"],
                                position=p["position"], csc=bool(p["csc"]), init_std=float(p["init_std"]),
                                generator=gen).to(device)
        if ctx_from is not None:
            _load_ctx(learner, ctx_from)
        else:
            from calibprompt.losses import build_objective

            objective = build_objective(method["losses"])
            _warn_if_smac_alpha_inert(method["losses"], train_s, int(tr["batch_size"]))
            settings = TrainSettings(**{k: tr[k] for k in TrainSettings.__dataclass_fields__})
            labels = torch.tensor([s.label for s in train_s])
            result = train_prompts(backbone, learner, objective, train_views, labels, settings, seed,
                                   zs_text_features=zs_text, progress=progress)
            timings["train"] = result.seconds
            train_info = {"steps": result.steps, "epoch_losses": result.losses,
                          "text_tokens": result.text_tokens, "n_train": len(train_s)}
        with torch.no_grad():
            text = learner.text_features(backbone)
        _save_ctx(learner, out_dir / "prompt.safetensors", run_hash)
    else:
        text = zs_text

    t = time.perf_counter()
    test_logits = predict_logits(test_feats, text, scale, int(resolved["eval"]["batch_size"])).cpu()
    posthoc_info = None
    if method["posthoc"]:
        from calibprompt.calibrators import get_calibrator

        val_logits = predict_logits(val_feats, text, scale).cpu()
        val_labels = torch.tensor([s.label for s in val_s])
        calibrator = get_calibrator(method["posthoc"]).fit(val_logits.numpy(), val_labels.numpy())
        test_logits = torch.as_tensor(calibrator.transform(test_logits.numpy()))
        posthoc_info = {"name": method["posthoc"], "params": calibrator.fitted_params(),
                        "n_val": len(val_s)}
    test_labels = np.array([s.label for s in test_s])
    metrics, metrics_ref = _evaluate(test_logits, test_labels, out_dir, resolved, dataset.classnames)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    _write_predictions(out_dir / "predictions.csv", test_s, test_logits)

    result = {
        "status": "done",
        "config_hash": run_hash,
        "run_id": run_hash[:16],
        "name": resolved.get("name"),
        "method": method["name"],
        "backbone": backbone.info.name,
        "dataset": dataset.name,
        "shots": int(resolved["shots"]),
        "seed": seed,
        "metrics": metrics,
        "metrics_reference": metrics_ref,
        "posthoc": posthoc_info,
        "train": train_info,
        "n_test": len(test_s),
        "n_val": len(val_s),
        "images_encoded": cache.encoded - encoded_before,
        "timings": timings,
        "versions": versions(device),
        "backbone_info": {"fingerprint": backbone.fingerprint(), **_info_dict(backbone)},
        "config": resolved,
    }
    atomic_write_json(out_dir / RESULT_FILE, result)  # last: its presence marks the run finished
    return result


_LAST_BACKBONE: dict = {}


def _loaded_backbone(backbone_cfg: dict, device: torch.device):
    """Load the configured backbone, reusing the one loaded by the previous run in this process when
    its config is the same (sweeps and the demo run many configs on one model). Frozen weights make
    the reuse safe; the weight files are re-checked by size and mtime."""
    from calibprompt.backbones import load_backbone
    from calibprompt.settings import sha256_json

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


def _warn_if_smac_alpha_inert(losses: list[dict], train_samples, batch_size: int) -> None:
    """method.md Q6: in a class-balanced batch SMAC's smoothed target is uniform whatever alpha is, so
    alpha then acts only through LS. Say so when every batch is the whole, balanced training set."""
    import warnings
    from collections import Counter

    smac = [spec for spec in losses if str(spec.get("name", "")).upper() == "SMAC" and spec.get("alpha")]
    counts = Counter(s.label for s in train_samples)
    if smac and len(train_samples) == batch_size and len(set(counts.values())) == 1:
        warnings.warn(
            "SMAC alpha has no effect here: every batch is the full class-balanced training set, so the "
            "smoothed batch frequency is 1/K for any alpha (method.md Q6); alpha acts only through LS.",
            stacklevel=3,
        )


def _evaluate(logits: torch.Tensor, labels: np.ndarray, out_dir: Path, resolved: dict,
              classnames: list[str]) -> tuple[dict, dict]:
    from calibprompt.metrics import calibration_metrics, reliability_diagram

    n_bins = int(resolved["eval"]["n_bins"])
    logits_np = logits.double().numpy()
    standard = calibration_metrics(logits_np, labels, n_bins=n_bins, convention="standard")
    reference = calibration_metrics(logits_np, labels, n_bins=n_bins, convention="reference")
    title = f"{resolved['resolved_method']['name']} · {resolved.get('name') or ''}".strip(" ·")
    reliability_diagram(logits_np, labels, out_dir / "reliability.png", n_bins=n_bins, title=title)
    return standard, reference


def _write_predictions(path: Path, samples, logits: torch.Tensor) -> None:
    probs = torch.softmax(logits.double(), dim=1).numpy()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["ref", "label", "prediction", *[f"prob_{k}" for k in range(probs.shape[1])]])
    for sample, row in zip(samples, probs):
        writer.writerow([sample.ref, sample.label, int(row.argmax()), *[f"{p:.8g}" for p in row]])
    atomic_write_text(path, buffer.getvalue())


def _save_ctx(learner, path: Path, run_hash: str) -> None:
    from safetensors.torch import save

    meta = {"config_hash": run_hash, "n_ctx": str(learner.n_ctx), "position": learner.position,
            "classnames": json.dumps(learner.classnames)}
    atomic_write_bytes(path, save({"ctx": learner.ctx.detach().cpu().contiguous()}, metadata=meta))


def _load_ctx(learner, path: str | Path) -> None:
    from safetensors.torch import load_file

    ctx = load_file(str(path))["ctx"]
    if tuple(ctx.shape) != tuple(learner.ctx.shape):
        raise ValueError(f"{path}: context of shape {tuple(ctx.shape)} does not fit this prompt learner "
                         f"{tuple(learner.ctx.shape)}; check prompt.n_ctx / prompt.csc and the backbone")
    with torch.no_grad():
        learner.ctx.copy_(ctx.to(learner.ctx.dtype))


def _info_dict(backbone) -> dict:
    from dataclasses import asdict

    return asdict(backbone.info)


def versions(device: torch.device) -> dict:
    import importlib.metadata as md

    out = {"calibprompt": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "torchvision", "open_clip_torch", "transformers", "timm", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    out["device"] = str(device)
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out
