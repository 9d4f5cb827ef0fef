"""Apply an exported model to new images: calibrated probabilities, the predicted class, the conformal
prediction set and the abstention flag per image.

Inputs are image files (any format the data layer reads: PNG, JPEG, TIFF, BMP, DICOM, 16-bit, grey),
folders (every image file below them, in sorted order) and CSV files (a ``path`` or ``image`` column,
else the first column; relative paths are taken from the CSV's folder). Images go through the
feature cache, so images seen before (e.g. by ``calibprompt eval``) are not encoded again.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from calibprompt.data.base import DataError
from calibprompt.deploy.model import DeployedModel, ModelFileError

PATH_COLUMNS = ("path", "image", "file", "filename")


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs`` (files, folders, CSV lists), each once, in the given order."""
    from calibprompt.data.images import image_kind

    out: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and image_kind(p))
            if not found:
                raise DataError(f"{path}: no image files in this folder (PNG, JPEG, TIFF, BMP, DICOM, ...)")
            out += found
        elif path.suffix.lower() == ".csv" and path.is_file():
            out += _csv_paths(path)
        elif path.is_file():
            if image_kind(path) is None:
                raise DataError(f"{path}: not an image file (PNG, JPEG, TIFF, BMP, DICOM, ...) nor a CSV list of them")
            out.append(path)
        else:
            raise DataError(f"{path} does not exist")
    return list(dict.fromkeys(p.resolve() for p in out))


def _csv_paths(path: Path) -> list[Path]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{path}: empty CSV; give one image path per row (a 'path' column)")
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows
    column = column or 0
    paths = []
    for number, row in enumerate(body, start=2 if body is not rows else 1):
        if len(row) <= column or not row[column].strip():
            raise DataError(f"{path}, row {number}: no image path")
        if number == 1 and not Path(row[column].strip()).suffix:
            raise DataError(f"{path}: the first row {row!r} looks like a header but names no known path column; "
                            f"call the column one of {', '.join(PATH_COLUMNS)}")
        p = Path(row[column].strip()).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise DataError(f"{path}, row {number}: {p} does not exist")
        paths.append(p)
    return paths


def files_dataset(paths: Sequence[Path], classnames: list[str], template: str, labels: Sequence[int] | None = None,
                  split: str = "test", unique_refs: bool = False, where: str = "predict"):
    """A dataset of image files (label 0 unless ``labels``); every file read and decoded now, so a corrupt
    one is an error naming it before any encoding starts. Refs are the paths, or with ``unique_refs``
    "<index>:<path>" so that a file listed twice is two samples. ``where`` names the caller in errors."""
    from calibprompt.data.files import FileDataset, FileEntry, check_files
    from calibprompt.data.images import image_kind

    labels = [0] * len(paths) if labels is None else labels
    entries = [FileEntry(f"{i}:{p}" if unique_refs else str(p), p, int(y), split, image_kind(p) or "image")
               for i, (p, y) in enumerate(zip(paths, labels))]
    good, _, hashes = check_files(entries, verify="full", skip_bad=False, where=where)
    return FileDataset(where, classnames, template, good, source=where, hashes=hashes)


def check_backbone(model: DeployedModel, backbone) -> None:
    if backbone.fingerprint() != model.backbone_fingerprint:
        raise ModelFileError(f"this model was fitted on another backbone (image-tower fingerprint "
                             f"{model.backbone_fingerprint[:12]}, the loaded one {backbone.fingerprint()[:12]}); "
                             f"load the backbone it was exported with ({model.backbone.get('name') or model.backbone.get('path')})")


def probabilities(model: DeployedModel, features: torch.Tensor) -> np.ndarray:
    """(N, K) calibrated class probabilities (float64) of cached image features."""
    from calibprompt.engine.pipeline import logits

    return torch.softmax(logits(model.head, features, model.calibrator).double(), dim=1).numpy()


def predict_files(model: DeployedModel, inputs: Sequence[str | Path], *, backbone=None, backbone_path: str | None = None,
                  cache=None, cache_dir: str | None = None, device: str = "cpu", progress: bool = False) -> list[dict]:
    """One record per image: ``image``, ``prediction`` (class name), ``probabilities`` {class: p},
    ``set`` (class names in the conformal set, or None without one) and ``abstain`` (or None)."""
    from calibprompt.engine.pipeline import decide, loaded_backbone, resolve_device
    from calibprompt.features import FeatureCache

    paths = image_files(inputs)
    if backbone is None:
        cfg = dict(model.backbone)
        if backbone_path:
            cfg["path"] = str(backbone_path)
        backbone = loaded_backbone(cfg, resolve_device(device))
    check_backbone(model, backbone)
    dataset = files_dataset(paths, model.classnames, model.template)
    # this machine's cache (``cache_dir`` or the default), with the run's encode settings
    cache = cache if cache is not None else FeatureCache(cache_dir, **(model.config.get("encode") or {}))
    feats = cache.features(backbone, dataset, dataset.samples, progress=progress)
    probs = probabilities(model, feats)
    sets, abstain = decide(probs, model.conformal, model.selective, dataset, dataset.samples)
    names = model.classnames
    return [{"image": sample.ref, "prediction": names[int(row.argmax())],
             "probabilities": {n: float(p) for n, p in zip(names, row)},
             "set": [names[k] for k in np.flatnonzero(sets[i])] if sets is not None else None,
             "abstain": bool(abstain[i]) if abstain is not None else None}
            for i, (sample, row) in enumerate(zip(dataset.samples, probs))]


def render(records: list[dict], fmt: str) -> str:
    """``json`` (a list of records) or ``csv`` (image, prediction, prob_<class>..., set, abstain)."""
    if fmt == "json":
        return json.dumps(records, indent=1)
    if fmt != "csv":
        raise ValueError(f"format must be json or csv, got {fmt!r}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = list(records[0]["probabilities"]) if records else []
    writer.writerow(["image", "prediction", *[f"prob_{n}" for n in names], "set", "abstain"])
    for r in records:
        writer.writerow([r["image"], r["prediction"], *[f"{r['probabilities'][n]:.10g}" for n in names],
                         "" if r["set"] is None else "|".join(r["set"]),
                         "" if r["abstain"] is None else int(r["abstain"])])
    return buffer.getvalue()
