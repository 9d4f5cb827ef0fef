"""The run folder: what a finished run leaves behind and how a finished run is recognised.

    config.yaml          resolved config
    split.json           the few-shot split (reusable with --split / split_file)
    head.safetensors     the fitted classifier head (any method; ``calibprompt eval --head``)
    prompt.safetensors   learned context vectors (prompt-learning methods)
    predictions.csv      per test sample: ref, label, prediction, class probabilities
    reliability.png/json reliability diagram and its data
    metrics.json         metrics (standard and reference conventions), resolved config, hash,
                         versions, seed, timings; written last, so its presence marks the run finished
"""

from __future__ import annotations

import csv
import io
import json
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from calibprompt import __version__
from calibprompt.settings import atomic_write_text

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


def predictions_csv(samples, logits: torch.Tensor, classnames: list[str] | None = None, sets=None,
                    abstain=None) -> str:
    """Per sample: ref, label, predicted class and the class probabilities (softmax in float64), one
    column per class named ``prob_<class name>`` (``prob_<k>`` without names); with ``sets`` (N, K) the
    conformal set as class indices joined by ``|``, with ``abstain`` (N,) the abstention flag."""
    probs = torch.softmax(logits.double(), dim=1).numpy()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    names = classnames if classnames and len(classnames) == probs.shape[1] else [str(k) for k in range(probs.shape[1])]
    writer.writerow(["ref", "label", "prediction", *[f"prob_{name}" for name in names],
                     *(["set"] if sets is not None else []), *(["abstain"] if abstain is not None else [])])
    for i, (sample, row) in enumerate(zip(samples, probs)):
        extra = ["|".join(str(k) for k in np.flatnonzero(sets[i]))] if sets is not None else []
        extra += [int(bool(abstain[i]))] if abstain is not None else []
        writer.writerow([sample.ref, sample.label, int(row.argmax()), *[f"{p:.8g}" for p in row], *extra])
    return buffer.getvalue()


def write_predictions(path: Path, samples, logits: torch.Tensor, classnames: list[str] | None = None, sets=None,
                      abstain=None) -> None:
    atomic_write_text(path, predictions_csv(samples, logits, classnames, sets, abstain))


def backbone_record(backbone) -> dict:
    return {"fingerprint": backbone.fingerprint(), **asdict(backbone.info)}


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
