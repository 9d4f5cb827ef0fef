"""Frozen image features, computed once and reused.

The image encoder is frozen, so a feature depends only on (weights, preprocessing, image content,
augmentation view). Each feature is stored on disk as one small safetensors file named by the sha256 of
that identity, and reused across epochs, methods, seeds and runs. Training augmentation comes from a
bank of pre-computed views per image: view ``v`` of an image is the paper's random-resized-crop + flip
drawn from an RNG seeded by (image content, v, aug_seed), so it is the same view in every run.

Safety: files are written atomically (concurrent writers of the same key write identical bytes), carry
their key and a sha256 of the feature in the metadata, and are validated on load (key, shape,
finiteness, checksum); a bad file is recomputed with one note. A disk that cannot be written (full,
read-only) turns the disk cache off for the process with one note; the run goes on. No pickle is read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibprompt.backbones.base import Backbone
from calibprompt.progress import note
from calibprompt.progress import progress as make_progress
from calibprompt.settings import cache_dir, sha256_json

log = logging.getLogger(__name__)


class FeatureCache:
    """Content-keyed store of frozen image features.

    ``encoded`` counts images actually passed through the image encoder (cache misses), so reuse can
    be measured; ``hits`` counts features served from memory or disk."""

    def __init__(self, root: str | Path | None = None, memory: bool = True):
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.memory: dict[str, torch.Tensor] | None = {} if memory else None
        self.encoded = 0
        self.hits = 0
        self.writable = True  # False after a failed write (full or read-only disk)

    # ---- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(weights: str, transform: dict, content: str, view: int | None, aug_seed: int) -> str:
        return sha256_json({"weights": weights, "transform": transform, "content": content,
                            "view": view, "aug_seed": aug_seed if view is not None else None})

    def _path(self, weights: str, key: str) -> Path:
        return self.root / weights[:16] / key[:2] / f"{key}.safetensors"

    # ---- public ---------------------------------------------------------------------------------
    def features(self, backbone: Backbone, dataset, samples: Sequence, view: int | None = None,
                 aug_seed: int = 0, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """(N, embed_dim) float32 features of ``samples`` (test transform when ``view`` is None,
        else augmentation view ``view``). Missing ones are computed in batches and stored."""
        return self.prefetch(backbone, dataset, [(samples, view)], aug_seed=aug_seed, batch_size=batch_size,
                             progress=progress)[0]

    def run_features(self, backbone: Backbone, dataset, eval_sets: Sequence[Sequence], train: Sequence = (),
                     n_views: int | None = None, aug_seed: int = 0, batch_size: int = 32,
                     progress: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What one run needs, in one encoder stream (so at most one padded batch): the features of each
        of ``eval_sets`` (test transform) and the training views of ``train``, shaped (N, V, D):
        ``n_views`` augmented views, or with ``n_views=None`` the test-transform feature (V = 1)."""
        views = [None] if n_views is None else list(range(n_views))
        groups = [(s, None) for s in eval_sets] + ([(train, v) for v in views] if len(train) else [])
        feats = self.prefetch(backbone, dataset, groups, aug_seed=aug_seed, batch_size=batch_size,
                              progress=progress)
        dim = backbone.info.embed_dim
        train_views = torch.stack(feats[len(eval_sets):], dim=1) if len(train) else torch.empty(0, len(views), dim)
        return feats[: len(eval_sets)], train_views

    def prefetch(self, backbone: Backbone, dataset, groups: Sequence[tuple[Sequence, int | None]],
                 aug_seed: int = 0, batch_size: int = 32, progress: bool = False) -> list[torch.Tensor]:
        """Features of several ``(samples, view)`` groups at once: ``[features(samples, view), ...]``.

        Every missing feature of every group is encoded in one stream of batches, so a caller that
        needs e.g. the test set and the training set pays for one padded batch instead of two."""
        weights = backbone.fingerprint()
        dim = backbone.info.embed_dim
        descs = {False: backbone.preprocess.describe(False), True: backbone.preprocess.describe(True)}
        out: list[list[torch.Tensor | None]] = []
        todo: list[tuple[int, int, object, str, bool]] = []  # (group, index, sample, key, train)
        for g, (samples, view) in enumerate(groups):
            train = view is not None
            keys = [self.key(weights, descs[train], dataset.content_hash(s), view, aug_seed) for s in samples]
            found = [self._lookup(weights, k, dim) for k in keys]
            out.append(found)
            todo += [(g, i, samples[i], keys[i], train) for i, f in enumerate(found) if f is None]
        if todo:
            self._encode(backbone, dataset, todo, out, weights, batch_size, progress)
        return [torch.stack(feats) if feats else torch.empty(0, dim) for feats in out]  # type: ignore[misc]

    def _encode(self, backbone: Backbone, dataset, todo: list, out: list, weights: str, batch_size: int,
                progress: bool) -> None:
        transforms = {}
        device = next(backbone.parameters()).device
        dtype = next(backbone.parameters()).dtype
        trains = {t[4] for t in todo}
        what = "augmented views" if trains == {True} else ("test images" if trains == {False} else "images")
        bar = make_progress(len(todo), f"encoding {what}", progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            tensors = []
            for _, _, sample, key, train in chunk:
                if train not in transforms:
                    transforms[train] = backbone.image_transform(train)
                tensors.append(_apply(transforms[train], dataset.load(sample), key if train else None))
            pixels = torch.stack(tensors)
            # Always encode a full batch (zero-padded): the encoder's output for one image changes in
            # the last bits with the batch size, so without padding a cached feature would depend on
            # which other images happened to be missing, i.e. on the order in which runs executed.
            if len(chunk) < batch_size:
                pad = pixels.new_zeros((batch_size - len(chunk), *pixels.shape[1:]))
                pixels = torch.cat([pixels, pad])
            with torch.no_grad():
                feats = backbone.encode_image(pixels.to(device=device, dtype=dtype)).float().cpu()
            feats = feats[: len(chunk)]
            self.encoded += len(chunk)
            for (g, i, _, key, _), feat in zip(chunk, feats):
                feat = feat.clone()  # own storage: a cached row must not keep its whole batch alive
                out[g][i] = feat
                self._store(weights, key, feat)
            del tensors, pixels, feats
            _release_freed_memory()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()

    # ---- storage --------------------------------------------------------------------------------
    def _lookup(self, weights: str, key: str, dim: int) -> torch.Tensor | None:
        if self.memory is not None and key in self.memory:
            self.hits += 1
            return self.memory[key]
        path = self._path(weights, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                feat = handle.get_tensor("feature")
            if meta.get("key") != key:
                raise ValueError("it was stored under another key (another model, transform or image)")
            if feat.shape != (dim,) or not bool(torch.isfinite(feat).all()):
                raise ValueError(f"shape {tuple(feat.shape)} or values do not fit a {dim}-d feature")
            if "sha256" not in meta:
                raise _Legacy()
            if meta["sha256"] != _digest(feat):
                raise ValueError("its checksum does not match its content")
        except _Legacy:
            note(f"feature cache: entries under {self.root} written by an older calibprompt (no checksum) are "
                 "recomputed once", key=f"legacy:{self.root}")
            path.unlink(missing_ok=True)
            return None
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
            note(f"feature cache: recomputing damaged entries under {self.root} (first: {path.name}: {err})",
                 key=f"damaged:{self.root}")
            log.info("discarding invalid cache entry %s (%s)", path, err)
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        if self.memory is not None:
            self.memory[key] = feat
        return feat

    def _store(self, weights: str, key: str, feat: torch.Tensor) -> None:
        if self.memory is not None:
            self.memory[key] = feat
        if not self.writable:
            return
        path = self._path(weights, key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(feat)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"feature": feat.contiguous()}, str(tmp), metadata={"key": key, "sha256": _digest(feat)})
            os.replace(tmp, path)  # atomic; a concurrent writer of the same key writes the same bytes
        except OSError as err:
            # The cache is an optimisation: a full or read-only disk must not fail the run.
            tmp.unlink(missing_ok=True)
            self.writable = False
            note(f"feature cache: cannot write under {self.root} ({err.strerror or err}); features are kept in "
                 "memory for this process only. Free space or set CALIBPROMPT_CACHE / cache_dir to another folder.")


_MALLOC_TRIM: object = None  # resolved on first use: glibc's malloc_trim, or False where there is none


def _release_freed_memory() -> None:
    """Hand the memory freed by an encoded batch (its activations) back to the OS, where glibc allows.

    glibc keeps freed large blocks in its heaps once its mmap threshold has adapted upwards; the heaps
    then fragment and resident memory creeps up with the number of batches encoded although nothing
    is held (measured with BiomedCLIP on CPU, peak growth from 250 to 1,000 test images: +331 MB
    without this call, +18 MB with it; docs/performance.md). ``malloc_trim`` costs milliseconds, a
    batch seconds."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


class _Legacy(Exception):
    """A cache entry from before checksums were stored."""


def _digest(feat: torch.Tensor) -> str:
    """sha256 of a feature's float32 bytes: detects a flipped byte anywhere in a cached file."""
    return hashlib.sha256(feat.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _apply(transform, image, view_key: str | None) -> torch.Tensor:
    """Apply ``transform``; for an augmentation view, seed its randomness from the view's key so
    the same (image, view) always gives the same crop and flip, whatever process computes it."""
    if view_key is None:
        return transform(image)
    seed = int.from_bytes(hashlib.sha256(view_key.encode()).digest()[:8], "little") & (2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
