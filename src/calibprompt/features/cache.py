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

import contextlib
import hashlib
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save

from calibprompt.backbones.base import Backbone
from calibprompt.features.loader import BatchBuilder, Item, auto_batches, check_workers, pixel_batches
from calibprompt.progress import note
from calibprompt.progress import progress as make_progress
from calibprompt.settings import cache_dir, sha256_json

log = logging.getLogger(__name__)


# Images per encoder batch. Measured on 2 CPU cores (docs/performance.md): ViT-B/32 encodes 16-32 images per
# batch at the same rate and 64 about 15% slower; not measured on a GPU here. Padding every batch to this
# size is what keeps a feature independent of its batch mates, so it is one number per cache.
ENCODE_BATCH = 32


class FeatureCache:
    """Content-keyed store of frozen image features.

    ``encoded`` counts images actually passed through the image encoder (cache misses), so reuse can
    be measured; ``hits`` counts features served from memory or disk."""

    def __init__(self, root: str | Path | None = None, memory: bool = True, workers: int | str = "auto",
                 loader_kind: str = "process", batch_size: int = ENCODE_BATCH):
        check_workers(workers, loader_kind)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"encode batch size must be a whole number >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.workers = workers  # processes (or threads) decoding ahead of the encoder; features.loader
        self.loader_kind = loader_kind
        self.memory: dict[str, torch.Tensor] | None = {} if memory else None
        self.encoded = 0
        self.hits = 0
        self.writable = True  # False after a failed write (full or read-only disk)
        self._dirs: set[Path] = set()  # shard folders known to exist (one mkdir each, not one per file)
        self._locks: dict = {}  # weights -> the encode FileLock of this cache

    # ---- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(weights: str, transform: dict, content: str, view: int | None, aug_seed: int,
            noise: Noise | None = None) -> str:
        fields = {"weights": weights, "transform": transform, "content": content,
                  "view": view, "aug_seed": aug_seed if view is not None else None}
        if noise is not None:  # a noisy view; clean features keep the keys they always had
            fields["noise"] = {"sigma": float(noise.sigma), "seed": int(noise.seed), "draw": int(noise.draw),
                               "stream": noise.stream}
        return sha256_json(fields)

    def _path(self, weights: str, key: str) -> Path:
        return self.root / weights[:16] / key[:2] / f"{key}.safetensors"

    # ---- public ---------------------------------------------------------------------------------
    def features(self, backbone: Backbone, dataset, samples: Sequence, view: int | None = None,
                 aug_seed: int = 0, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """(N, embed_dim) float32 features of ``samples`` (test transform when ``view`` is None,
        else augmentation view ``view``). Missing ones are computed in batches and stored."""
        return self.prefetch(backbone, dataset, [(samples, view)], aug_seed=aug_seed, batch_size=batch_size,
                             progress=progress)[0]

    def run_features(self, backbone: Backbone, dataset, eval_sets: Sequence[Sequence], train: Sequence = (),
                     n_views: int | None = None, aug_seed: int = 0, batch_size: int | None = None,
                     progress: bool = False, train_noise: Sequence[Noise] | None = None
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """What one run needs, in one encoder stream (so at most one padded batch): the features of each
        of ``eval_sets`` (test transform) and the training views of ``train``, shaped (N, V, D):
        ``n_views`` augmented views, or with ``n_views=None`` the test-transform feature (V = 1).
        ``train_noise``: one :class:`Noise` per training view (V = its length), on the augmented view
        (``n_views`` given) or on the test-transform image (``n_views=None``)."""
        if train_noise is not None:
            views = list(range(len(train_noise))) if n_views is not None else [None] * len(train_noise)
            train_groups = [(train, v, noise) for v, noise in zip(views, train_noise)]
        else:
            views = [None] if n_views is None else list(range(n_views))
            train_groups = [(train, v) for v in views]
        groups = [(s, None) for s in eval_sets] + (train_groups if len(train) else [])
        feats = self.prefetch(backbone, dataset, groups, aug_seed=aug_seed, batch_size=batch_size,
                              progress=progress)
        dim = backbone.info.embed_dim
        train_views = torch.stack(feats[len(eval_sets):], dim=1) if len(train) else torch.empty(0, len(views), dim)
        return feats[: len(eval_sets)], train_views

    def noisy_features(self, backbone: Backbone, dataset, samples: Sequence, sigma: float, draws: Sequence[int],
                       seed: int = 0, batch_size: int | None = None, progress: bool = False,
                       stream: str = "certify") -> torch.Tensor:
        """(N, len(draws), D) features of ``samples`` (test transform) with Gaussian pixel noise ``sigma``,
        draws ``draws`` of noise stream ``seed``: each (image, sigma, seed, draw) is encoded once and cached,
        so certification draws, noisy training views and repeated sweeps share them."""
        groups = [(samples, None, Noise(float(sigma), int(seed), int(d), stream)) for d in draws]
        feats = self.prefetch(backbone, dataset, groups, batch_size=batch_size, progress=progress)
        dim = backbone.info.embed_dim
        return torch.stack(feats, dim=1) if feats else torch.empty(len(samples), 0, dim)

    def prefetch(self, backbone: Backbone, dataset, groups: Sequence[tuple],
                 aug_seed: int = 0, batch_size: int | None = None, progress: bool = False) -> list[torch.Tensor]:
        """Features of several ``(samples, view)`` or ``(samples, view, noise)`` groups at once:
        ``[features(samples, view), ...]``; ``noise`` (a :class:`Noise`) adds Gaussian pixel noise, seeded
        per image from the cache key, so a noisy view is the same in every process and run.

        Every missing feature of every group is encoded in one stream of batches, so a caller that
        needs e.g. the test set and the training set pays for one padded batch instead of two."""
        weights = backbone.fingerprint()
        dim = backbone.info.embed_dim
        descs = {False: backbone.preprocess.describe(False), True: backbone.preprocess.describe(True)}
        out: list[list[torch.Tensor | None]] = []
        todo: list[tuple] = []  # (group, index, sample, key, train, noise)
        for g, (samples, view, *rest) in enumerate(groups):
            train, noise = view is not None, (rest[0] if rest else None)
            keys = [self.key(weights, descs[train], dataset.content_hash(s), view, aug_seed, noise) for s in samples]
            found = [self._lookup(weights, k, dim) for k in keys]
            out.append(found)
            todo += [(g, i, samples[i], keys[i], train, noise) for i, f in enumerate(found) if f is None]
        if todo:
            with self._encode_lock(weights):
                todo = self._still_missing(todo, out, weights, dim)
                if todo:
                    self._encode(backbone, dataset, todo, out, weights, int(batch_size or self.batch_size), progress)
        return [torch.stack(feats) if feats else torch.empty(0, dim) for feats in out]  # type: ignore[misc]

    @contextlib.contextmanager
    def _encode_lock(self, weights: str):
        """One process at a time encodes for these weights under this root: workers that share the cache
        (``sweep --jobs``, Ray workers on a shared path) wait, then find the features on disk instead of
        encoding the same image twice. A cache that cannot hold a lock file (read-only) goes without."""
        from filelock import FileLock

        try:
            lock = self._locks.get(weights)
            if lock is None:  # one instance per weights: a FileLock instance is re-entrant, two are not
                folder = self.root / weights[:16]
                folder.mkdir(parents=True, exist_ok=True)
                lock = self._locks[weights] = FileLock(str(folder / ".encode.lock"))
            lock.acquire()
        except OSError:
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def _still_missing(self, todo: list, out: list, weights: str, dim: int) -> list:
        """The ``todo`` entries that another process has not written meanwhile (those are filled in)."""
        left = []
        for entry in todo:
            g, i, key = entry[0], entry[1], entry[3]
            found = self._lookup(weights, key, dim)
            if found is None:
                left.append(entry)
            else:
                out[g][i] = found
        return left

    def _encode(self, backbone: Backbone, dataset, todo: list, out: list, weights: str, batch_size: int,
                progress: bool) -> None:
        device = next(backbone.parameters()).device
        trains = {t[4] for t in todo}
        what = "augmented views" if trains == {True} else ("test images" if trains == {False} else "images")
        if any(t[5] is not None for t in todo):
            what = "noisy views"
        bar = make_progress(len(todo), f"encoding {what}", progress)
        chunks = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        # Every batch has exactly ``batch_size`` rows (zero-padded): the encoder's output for one image
        # changes in the last bits with the batch size, so without padding a cached feature would depend
        # on which other images happened to be missing, i.e. on the order in which runs executed.
        builder = BatchBuilder(dataset, backbone.preprocess,
                               [[Item(t[2], t[4], view_seed(t[3]) if t[4] else None,
                                      None if t[5] is None else (t[5].sigma, view_seed(t[3] + ":noise")))
                                 for t in chunk] for chunk in chunks],
                               batch_size, dtype=backbone.dtype)
        pin = device.type == "cuda"
        batches = auto_batches(builder, device, self.loader_kind, pin) if self.workers == "auto" else \
            pixel_batches(builder, self.workers, self.loader_kind, pin)
        pending: list = []
        with ThreadPoolExecutor(1, thread_name_prefix="calibprompt-cache-writer") as pool:
            write = lambda *args: pending.append(pool.submit(self._write, *args))  # noqa: E731
            self._encode_batches(backbone, chunks, batches, out, weights, device, write, bar)
        for done in pending:  # the pool has finished: surface any error but a disk's (those turn the cache off)
            done.result()
        if bar is not None:
            bar.close()

    def _encode_batches(self, backbone, chunks, batches, out, weights, device, write, bar) -> None:
        """Encode each pixel batch and hand its rows to ``out``, the memory cache and ``write`` (the disk,
        on a background thread). The caller waits for the writes: when ``features`` returns, every file
        is in place."""
        for chunk, pixels in zip(chunks, batches):
            with torch.no_grad():
                feats = backbone.encode_image(pixels.to(device, non_blocking=True)).float().cpu()
            feats = feats[: len(chunk)]
            self.encoded += len(chunk)
            for (g, i, _, key, *_), feat in zip(chunk, feats):
                feat = feat.clone()  # own storage: a cached row must not keep its whole batch alive
                out[g][i] = feat
                self._store(weights, key, feat, write)
            del pixels, feats
            _release_freed_memory()
            if bar is not None:
                bar.update(len(chunk))

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

    def _store(self, weights: str, key: str, feat: torch.Tensor, write=None) -> None:
        """Keep ``feat`` in memory and write it to disk, through ``write`` (it queues ``_write`` on a
        background thread) when given: creating small files is slow on some disks (0.8 ms each measured
        here, more than encoding the image on the micro model), and the encoder need not wait for it."""
        if self.memory is not None:
            self.memory[key] = feat
        if not self.writable:
            return
        (write or self._write)(weights, key, feat)

    def _write(self, weights: str, key: str, feat: torch.Tensor, retry: bool = True) -> None:
        if not self.writable:
            return
        path = self._path(weights, key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if path.parent not in self._dirs:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._dirs.add(path.parent)
            data = save({"feature": feat.contiguous()}, metadata={"key": key, "sha256": _digest(feat)})
            _write_bytes(tmp, data)
            os.replace(tmp, path)  # atomic; a concurrent writer of the same key writes the same bytes
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if retry and isinstance(err, FileNotFoundError):  # the folder was removed meanwhile: make it again
                self._dirs.discard(path.parent)
                return self._write(weights, key, feat, retry=False)
            # The cache is an optimisation: a full or read-only disk must not fail the run.
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


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:  # Python's write releases the GIL (safetensors' save_file does not)
        handle.write(data)


def _digest(feat: torch.Tensor) -> str:
    """sha256 of a feature's float32 bytes: detects a flipped byte anywhere in a cached file."""
    return hashlib.sha256(feat.detach().float().contiguous().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class Noise:
    """Gaussian pixel noise of a view: standard deviation ``sigma`` on the [0, 1] image, the noise ``seed``,
    the ``draw`` index and what the draws are for (``stream``: "train", "certify", "tta"), so streams
    never share a draw whatever their seeds; the pixels' generator is seeded from the whole cache key."""

    sigma: float
    seed: int = 0
    draw: int = 0
    stream: str = "certify"


def view_seed(view_key: str) -> int:
    """The seed of an augmentation view's crop and flip, from its cache key: the same (image, view, aug_seed)
    gives the same crop in every process, thread and run."""
    return int.from_bytes(hashlib.sha256(view_key.encode()).digest()[:8], "little") & (2**63 - 1)
