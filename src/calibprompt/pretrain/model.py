"""The micro model's architecture and its folder: where it lives, its metadata, pretraining it when
missing. Saved in open_clip's hub format, so it loads through the normal backbone path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

from calibprompt.settings import atomic_write_json, cache_dir, sha256_file

MODEL_PREFIX = "micro-medmnist"
DEFAULT_SOURCES = ("pneumoniamnist", "breastmnist")
META_FILE = "micro_pretrain.json"


def micro_model_cfg(context_length: int = 32, width: int = 128, embed_dim: int = 128, vision_layers: int = 4,
                    text_layers: int = 3, patch_size: int = 4, image_size: int = 28) -> dict:
    """open_clip ``model_cfg`` of the micro model (CLIP BPE vocabulary of 49,408 tokens)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width,
                       "layers": vision_layers, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": max(1, width // 32), "layers": text_layers},
    }


def save_model(backbone, out_dir: Path, meta: dict) -> None:
    """Write the hub-format folder atomically: a temporary sibling folder renamed into place."""
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_dir(tmp)
    meta = {**meta, "weights_sha256": sha256_file(tmp / "open_clip_model.safetensors")}
    atomic_write_json(tmp / META_FILE, meta)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def model_dir(sources: Sequence[str] = DEFAULT_SOURCES, root: str | Path | None = None) -> Path:
    """``<cache>/models/micro-medmnist`` for the default sources, else ``micro-medmnist-<names>``."""
    base = Path(root).expanduser() if root else cache_dir() / "models"
    names = sorted(sources)
    if names == sorted(DEFAULT_SOURCES):
        return base / MODEL_PREFIX
    label = "-".join(n.replace("mnist", "") for n in names)
    if len(label) > 40:
        label = hashlib.sha256("|".join(names).encode()).hexdigest()[:12]
    return base / f"{MODEL_PREFIX}-{label}"


def read_meta(folder: str | Path) -> dict | None:
    """The pretraining metadata of a micro model folder, or None when it is not a complete one."""
    folder = Path(folder).expanduser()
    path = folder / META_FILE
    if not (folder / "open_clip_model.safetensors").is_file() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_model(data_cfgs: Sequence[dict], folder: str | Path | None = None,
                 settings=None, progress: bool = True, retrain: bool = False,
                 log: Callable[[str], None] | None = None) -> tuple[Path, dict, bool]:
    """The micro model pretrained on ``data_cfgs`` (pretraining it when missing, or when ``retrain``).
    Returns (folder, metadata, whether it was trained now). A folder pretrained on other datasets is
    an error: choose another folder."""
    names = [str(c.get("name") or Path(c["path"]).stem) for c in data_cfgs]
    folder = Path(folder).expanduser() if folder else model_dir(names)
    meta = read_meta(folder)
    if meta is not None and not retrain:
        have = sorted(s["name"] for s in meta.get("sources", []))
        if have != sorted(names):
            raise ValueError(f"{folder} holds a micro model pretrained on {have}, not {sorted(names)}; "
                             "pass another folder or --retrain")
        return folder, meta, False
    from calibprompt.pretrain.loop import pretrain_micro

    meta = pretrain_micro(data_cfgs, folder, settings, progress=progress, log=log)
    return folder, meta, True
