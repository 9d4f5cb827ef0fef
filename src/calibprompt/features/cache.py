"""Frozen image features, computed once and reused.

The image encoder is frozen, so a feature depends only on (weights, preprocessing, image content,
augmentation view[, pixel noise]). Each feature is keyed by the sha256 of that identity, kept in the
image tower's sharded store (:mod:`calibprompt.features.store`: a few memory-mapped files, not one per
image) and reused across epochs, methods, seeds, runs and processes. Training augmentation comes from a
bank of pre-computed views per image: view ``v`` of an image is the paper's random-resized-crop + flip
drawn from an RNG seeded by (image content, v, aug_seed), so it is the same view in every run.

Safety: segments are appended atomically and validated on first read (format, weights, shapes, sha256;
a damaged one keeps only its rows that pass their own digest, with one note). A disk that cannot be
written (full, read-only) turns the disk cache off for the process with one note; the run goes on with
the features in memory. Per-image files of older versions are validated and moved into the store
(:mod:`calibprompt.features.legacy`). No pickle is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from calibprompt.backbones.base import Backbone
from calibprompt.features.legacy import legacy_folders, read_legacy, remove_moved
from calibprompt.features.loader import BatchBuilder, Item, auto_batches, check_workers, pixel_batches
from calibprompt.features.store import FeatureStore
from calibprompt.progress import note
from calibprompt.progress import progress as make_progress
from calibprompt.settings import cache_dir, sha256_json

log = logging.getLogger(__name__)


# Images per encoder batch. Measured on 2 CPU cores (docs/performance.md): ViT-B/32 encodes 16-32 images per
# batch at the same rate and 64 about 15% slower; not measured on a GPU here. Padding every batch to this
# size is what keeps a feature independent of its batch mates, so it is one number per cache.
ENCODE_BATCH = 32
# Encoded rows are appended to the store as one segment per this many rows or seconds, whichever comes
# first: few files, and an interrupted run loses at most this much encoding.
FLUSH_ROWS, FLUSH_SECONDS = 2048, 60.0


class FeatureCache:
    """Content-keyed store of frozen image features.

    ``encoded`` counts images actually passed through the image encoder (cache misses), so reuse can
    be measured; ``hits`` counts features served from memory or disk. ``memory``: keep the features this
    process encoded in memory when the disk cache cannot be written (else they are encoded again)."""

    def __init__(self, root: str | Path | None = None, memory: bool = True, workers: int | str = "auto",
                 loader_kind: str = "process", batch_size: int = ENCODE_BATCH, amp: str = "none"):
        check_workers(workers, loader_kind)
        if amp not in AMP_DTYPES:
            raise ValueError(f"encode amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.amp = amp  # mixed precision of the image tower; part of every feature's key when not "none"
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
        self.readable = True  # False after a failed read of the store (e.g. a folder without permission)
        self._stores: dict[str, FeatureStore] = {}  # weights -> its sharded store under this root
        self._legacy: dict[str, bool] = {}  # weights -> whether per-image files of an older version remain
        self._locks: dict = {}  # weights -> the encode FileLock of this cache

    # ---- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(weights: str, transform: dict, content: str, view: int | None, aug_seed: int,
            noise: Noise | None = None, amp: str = "none") -> str:
        fields = {"weights": weights, "transform": transform, "content": content,
                  "view": view, "aug_seed": aug_seed if view is not None else None}
        if amp != "none":  # features of a mixed-precision encoder are others; fp32 keys stay as they were
            fields["amp"] = amp
        if noise is not None:  # a noisy view; clean features keep the keys they always had
            fields["noise"] = {"sigma": float(noise.sigma), "seed": int(noise.seed), "draw": int(noise.draw),
                               "stream": noise.stream}
        return sha256_json(fields)

    def with_amp(self, amp: str) -> "FeatureCache":
        """This cache for an image tower run under ``amp``: itself when it matches, else a cache on the same
        root with the same settings (kept, so its stores stay open). A run's config decides the precision,
        not whoever built the cache (a sweep's workers share one per root)."""
        if amp == self.amp:
            return self
        siblings = self.__dict__.setdefault("_siblings", {})
        if amp not in siblings:
            siblings[amp] = FeatureCache(self.root, self.memory is not None, self.workers, self.loader_kind,
                                         self.batch_size, amp)
        return siblings[amp]

    def store(self, weights: str, dim: int) -> FeatureStore:
        """The sharded store of the image tower with fingerprint ``weights`` under this cache's root."""
        if weights not in self._stores:
            self._stores[weights] = FeatureStore(self.root / weights[:16] / "store", weights, dim)
        return self._stores[weights]

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
        out: list[torch.Tensor] = []
        todo: list[tuple] = []  # (group, index, sample, key, train, noise)
        for g, (samples, view, *rest) in enumerate(groups):
            train, noise = view is not None, (rest[0] if rest else None)
            keys = [self.key(weights, descs[train], dataset.content_hash(s), view, aug_seed, noise, self.amp)
                    for s in samples]
            rows, missing = self._read(weights, keys, dim)
            out.append(rows)
            todo += [(g, i, samples[i], keys[i], train, noise) for i in missing]
        if todo:
            with self._encode_lock(weights):
                todo = self._still_missing(todo, out, weights, dim)
                if todo:
                    self._encode(backbone, dataset, todo, out, weights, int(batch_size or self.batch_size), progress)
        return out

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
        rows, missing = self._read(weights, [t[3] for t in todo], dim)
        for j, entry in enumerate(todo):
            out[entry[0]][entry[1]] = rows[j]
        return [todo[j] for j in missing]

    def _read(self, weights: str, keys: list[str], dim: int) -> tuple[torch.Tensor, list[int]]:
        """The stored rows of ``keys`` (zeros where missing) and the missing positions: the store first,
        then this process's unwritten features, then per-image files of an older version (moved)."""
        rows, missing = torch.zeros(len(keys), dim), list(range(len(keys)))
        if self.readable:
            try:
                rows, missing = self.store(weights, dim).get(keys)
            except OSError as err:
                self.readable = False
                self._disk_failed(err, "read")
        if missing and self.memory:
            held = [j for j in missing if keys[j] in self.memory]
            for j in held:
                rows[j] = self.memory[keys[j]]
            missing = sorted(set(missing) - set(held))
        if missing and self._has_legacy(weights):
            missing = self._migrate(weights, keys, rows, missing, dim)
        self.hits += len(keys) - len(missing)
        return rows, missing

    def _has_legacy(self, weights: str) -> bool:
        if weights not in self._legacy:
            self._legacy[weights] = bool(legacy_folders(self.root, weights))
        return self._legacy[weights]

    def _migrate(self, weights: str, keys: list[str], rows: torch.Tensor, missing: list[int], dim: int) -> list[int]:
        """Fill ``rows`` from per-image files of an older calibprompt and move those into the store."""
        moved, left = [], []
        for j in missing:
            feat = read_legacy(self.root, weights, keys[j], dim)
            if feat is None:
                left.append(j)
            else:
                rows[j] = feat
                moved.append(j)
        if moved and self.writable:
            try:
                self.store(weights, dim).put([keys[j] for j in moved], rows[moved])
            except OSError as err:
                self._disk_failed(err)
            else:
                remove_moved(self.root, weights, [keys[j] for j in moved])
                note(f"feature cache: moving per-image entries of an older calibprompt under {self.root} into "
                     "the sharded store (once; nothing is recomputed)", key=f"migrate:{self.root}")
        if not legacy_folders(self.root, weights):
            self._legacy[weights] = False
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
            def write(rows: list) -> None:  # a segment per flush, written on the background thread
                pending.append(pool.submit(self._put, weights, backbone.info.embed_dim, rows))
            self._encode_batches(backbone, chunks, batches, out, device, write, bar)
        for done in pending:  # the pool has finished: surface any error but a disk's (those turn the cache off)
            done.result()
        if bar is not None:
            bar.close()

    def _encode_batches(self, backbone, chunks, batches, out, device, write, bar) -> None:
        """Encode each pixel batch and hand its rows to ``out`` and, every :data:`FLUSH_ROWS` rows or
        :data:`FLUSH_SECONDS`, to ``write`` (the store, on a background thread). The caller waits for the
        writes: when ``features`` returns, every segment is in place."""
        rows: list[tuple[str, torch.Tensor]] = []
        flushed = time.monotonic()
        for chunk, pixels in zip(chunks, batches):
            with torch.no_grad(), autocast(device, self.amp):
                feats = backbone.encode_image(pixels.to(device, non_blocking=True)).float().cpu()
            feats = feats[: len(chunk)]
            self.encoded += len(chunk)
            for (g, i, _, key, *_), feat in zip(chunk, feats):
                out[g][i] = feat
                rows.append((key, feat))
            del pixels, feats
            _release_freed_memory()
            if len(rows) >= FLUSH_ROWS or time.monotonic() - flushed > FLUSH_SECONDS:
                write(rows)
                rows, flushed = [], time.monotonic()
            if bar is not None:
                bar.update(len(chunk))
        if rows:
            write(rows)

    # ---- storage --------------------------------------------------------------------------------
    def _put(self, weights: str, dim: int, rows: list[tuple[str, torch.Tensor]]) -> None:
        """Append encoded ``(key, feature)`` rows to the store; on a disk error keep them in memory."""
        if self.writable:
            try:
                self.store(weights, dim).put([k for k, _ in rows], torch.stack([f for _, f in rows]))
                return
            except OSError as err:
                self._disk_failed(err)
        if self.memory is not None:
            for key, feat in rows:
                self.memory[key] = feat.clone()  # own storage: a row must not keep its batch alive

    def _disk_failed(self, err: OSError, what: str = "write") -> None:
        # The cache is an optimisation: a full, read-only or unreadable disk must not fail the run.
        self.writable = False
        note(f"feature cache: cannot {what} under {self.root} ({err.strerror or err}); features are kept in "
             "memory for this process only. Free space or set CALIBPROMPT_CACHE / cache_dir to another folder.")


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` ("bf16", "fp16") on ``device`` (CUDA or CPU), or nothing for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


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
