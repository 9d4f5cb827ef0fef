"""Feature caches written before the sharded store (one safetensors file per feature): read once, moved into
the store, removed. Never silently ignored: each entry is validated as it always was (key, shape, finite
values, checksum), and the move is announced once per cache root."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import safe_open

from calibprompt.features.store import damage_note, remove
from calibprompt.progress import note

_SHARD = re.compile(r"^[0-9a-f]{2}$")


def legacy_folders(root: Path, weights: str) -> list[Path]:
    """The per-image shard folders (``<root>/<weights[:16]>/<key[:2]>/``) an older calibprompt left."""
    base = root / weights[:16]
    try:
        return [p for p in base.iterdir() if p.is_dir() and _SHARD.match(p.name)]
    except OSError:
        return []


def legacy_path(root: Path, weights: str, key: str) -> Path:
    return root / weights[:16] / key[:2] / f"{key}.safetensors"


def read_legacy(root: Path, weights: str, key: str, dim: int) -> torch.Tensor | None:
    """The feature stored under ``key`` by the per-image layout, or None (absent, or invalid: then removed
    with a note, so it is recomputed)."""
    path = legacy_path(root, weights, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            feat = handle.get_tensor("feature")
    except FileNotFoundError:  # moved into the store by another process meanwhile
        return None
    except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
        return _discard(root, path, err)
    try:
        if meta.get("key") != key:
            raise ValueError("it was stored under another key (another model, transform or image)")
        if feat.shape != (dim,) or not bool(torch.isfinite(feat).all()):
            raise ValueError(f"shape {tuple(feat.shape)} or values do not fit a {dim}-d feature")
        if "sha256" not in meta:
            note(f"feature cache: entries under {root} written by an older calibprompt (no checksum) are "
                 "recomputed once", key=f"legacy:{root}")
            remove(path)
            return None
        if meta["sha256"] != digest(feat):
            raise ValueError("its checksum does not match its content")
    except ValueError as err:
        return _discard(root, path, err)
    return feat


def _discard(root: Path, path: Path, err: Exception) -> None:
    damage_note(root, path, str(err))
    remove(path)  # a read-only cache keeps it: skipped, never trusted
    return None


def digest(feat: torch.Tensor) -> str:
    """sha256 of a feature's float32 bytes, as the per-image layout stored it beside each feature."""
    return hashlib.sha256(feat.detach().float().contiguous().numpy().tobytes()).hexdigest()


def remove_moved(root: Path, weights: str, keys: list[str]) -> None:
    """Delete the per-image files of ``keys`` (now in the store) and the shard folders left empty."""
    for key in keys:
        remove(legacy_path(root, weights, key))
    for folder in legacy_folders(root, weights):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
