"""A sharded, memory-mapped store of feature rows: one per image tower, a few dozen files for 100k+ rows.

A store lives in ``<cache root>/<weights[:16]>/store/`` and is a set of immutable **segments**, each one
safetensors file holding

* ``keys`` (n, 32) uint8: each row's cache key (the sha256 of weights, transform, image content, view
  and noise; :meth:`FeatureCache.key`), in binary;
* ``features`` (n, D) float32: the rows;
* ``row_digest`` (n, 8) uint8: the first 8 bytes of sha256(key + row), to salvage a damaged segment;

and in its metadata the format, the weights fingerprint, the shape and a sha256 of all three tensors.

* **Append** = write a new segment to a temporary name and rename it into place (atomic), so a reader
  sees a whole segment or none, an interrupted writer leaves nothing that is taken as done, and
  processes sharing the folder (``sweep --jobs``, Ray workers on a shared path) never write the same file.
* **Read** = map each segment (``numpy.memmap`` at the offsets of the safetensors header), check its
  sha256 once per process, and index its keys; a lookup of N keys is one dictionary probe per key and
  one gather per segment. Nothing is unpickled.
* **Compaction**: when more than :data:`MAX_SEGMENTS` segments exist, the smaller half is merged into
  one (then removed), so the file count stays bounded while the cost of merging stays proportional to
  what is merged (size-tiered, as log-structured stores do).
* **Damage**: a segment that fails its checksum keeps the rows whose own digest still matches (moved to
  a new segment; the rest are recomputed by the caller), a segment that cannot be parsed or belongs to
  other weights is removed; each case gives one note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from calibprompt.progress import note
from calibprompt.settings import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "calibprompt.features/2"
MAX_SEGMENTS = 24  # above this, the smaller half is merged: a few dozen files whatever the row count
KEY_BYTES = 32
DIGEST_BYTES = 8


@dataclass
class _Segment:
    path: Path
    keys: np.ndarray  # (n, 32) uint8, memory-mapped
    features: np.ndarray  # (n, D) float32, memory-mapped
    digests: np.ndarray  # (n, 8) uint8, memory-mapped
    start: int  # global id of its first row in this process's index

    @property
    def rows(self) -> int:
        return len(self.features)


class FeatureStore:
    """The rows of one image tower (``weights``: its fingerprint) under ``folder``; thread-safe.

    ``get(keys)`` returns the rows found and the positions missing; ``put(keys, rows)`` appends a segment."""

    def __init__(self, folder: str | Path, weights: str, dim: int):
        self.folder = Path(folder)
        self.weights = weights
        self.dim = int(dim)
        self._segments: list[_Segment] = []
        self._seen: set[str] = set()  # segment names opened (or rejected) by this process
        self._index: dict[bytes, int] = {}  # key -> global row id (first segment wins)
        self._starts = np.zeros(0, dtype=np.int64)
        self._lock = threading.RLock()
        self._verified: set[str] = set()  # segment names whose sha256 this process has checked
        self._undeletable: set[str] = set()  # merged segments the OS would not let us remove (Windows)
        self.files_written = 0

    # ---- reading ------------------------------------------------------------------------------
    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """``(rows, missing)``: an (N, D) float32 tensor with the stored row of each key (zeros where
        there is none) and the positions of the keys the store does not hold."""
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        if not keys:
            return torch.from_numpy(out), []
        binary = [bytes.fromhex(k) for k in keys]
        with self._lock:
            ids = self._probe(binary)
            if (ids < 0).any():  # another process may have appended since: look at the folder again
                self.refresh()
                ids = self._probe(binary)
            found = np.flatnonzero(ids >= 0)
            seg_of = np.searchsorted(self._starts, ids[found], side="right") - 1
            for s in np.unique(seg_of):
                pick = found[seg_of == s]
                segment = self._segments[s]
                rows = ids[pick] - segment.start
                order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads of the mapping
                out[pick[order]] = segment.features[rows[order]]
        return torch.from_numpy(out), np.flatnonzero(ids < 0).tolist()

    def __len__(self) -> int:
        with self._lock:
            self.refresh()
            return len(self._index)

    def _probe(self, binary: list[bytes]) -> np.ndarray:
        get = self._index.get
        return np.fromiter((get(k, -1) for k in binary), dtype=np.int64, count=len(binary))

    def refresh(self) -> None:
        """Open the segments that appeared in the folder since the last look (other writers, other
        processes). When segments this process holds were removed (merged by a compaction here or
        elsewhere), the index is rebuilt from the files there now, so their mappings (and descriptors,
        and the disk space of the removed files) are let go."""
        with self._lock:
            listing = self._listing()
            names = {p.name for p in listing}
            if any(seg.path.name not in names for seg in self._segments):
                self._reset()
            for path in listing:
                if path.name not in self._seen:
                    self._open(path)

    def _reset(self) -> None:
        self._segments, self._seen, self._index = [], set(), {}
        self._starts = np.zeros(0, dtype=np.int64)

    def _listing(self) -> list[Path]:
        try:
            return sorted(p for p in self.folder.iterdir() if p.name.startswith("seg-") and p.suffix == ".safetensors")
        except FileNotFoundError:
            return []

    def _open(self, path: Path) -> None:
        try:
            meta, tensors = _map(path)
        except FileNotFoundError:
            return  # merged away between the listing and now
        except (ValueError, KeyError) as err:
            return self._reject(path, f"cannot be read ({err})")
        except OSError as err:  # too many open files, no permission, I/O error: not the file's fault
            log.warning("feature store: cannot open %s (%s); its rows are computed again", path, err)
            return
        self._seen.add(path.name)
        if meta.get("format") != FORMAT or meta.get("weights") != self.weights:
            return self._reject(path, f"was written for other weights or format ({meta.get('weights', '?')[:16]})")
        keys, feats, digests = tensors.get("keys"), tensors.get("features"), tensors.get("row_digest")
        if keys is None or feats is None or digests is None or feats.shape[1:] != (self.dim,) or \
                keys.shape != (len(feats), KEY_BYTES) or digests.shape != (len(feats), DIGEST_BYTES):
            return self._reject(path, f"its tensors do not fit {self.dim}-d rows")
        if path.name not in self._verified:  # once per process: segment files never change once named
            if _sha256(keys, feats, digests) != meta.get("sha256"):
                return self._salvage(path, keys, feats, digests)
            self._verified.add(path.name)
        self._add(_Segment(path, keys, feats, digests, start=0))

    def _add(self, segment: _Segment) -> None:
        """Index a segment's rows. A key held twice (two writers without the lock) resolves to the copy in
        the segment whose name sorts first (the oldest), whatever order this process opened them in."""
        segment.start = int(self._starts[-1] + self._segments[-1].rows) if self._segments else 0
        self._segments.append(segment)
        self._starts = np.append(self._starts, segment.start)
        flat = segment.keys.tobytes()
        index = self._index
        for i in range(segment.rows):
            key = flat[i * KEY_BYTES : (i + 1) * KEY_BYTES]
            held = index.get(key)
            if held is None or self._segment_of(held).path.name > segment.path.name:
                index[key] = segment.start + i

    def _segment_of(self, row: int) -> _Segment:
        return self._segments[int(np.searchsorted(self._starts, row, side="right")) - 1]

    def _reject(self, path: Path, why: str) -> None:
        self._seen.add(path.name)  # not opened again by this process, even where it cannot be removed
        _damage_note(self.folder, path, why)
        remove(path)

    def _salvage(self, path: Path, keys: np.ndarray, feats: np.ndarray, digests: np.ndarray) -> None:
        """Keep the rows of a damaged segment whose own digest still matches and are finite."""
        good = [i for i in range(len(feats)) if np.isfinite(feats[i]).all()
                and _row_digest(keys[i], feats[i]) == digests[i].tobytes()]
        _damage_note(self.folder, path, f"its checksum does not match its content; {len(good)} of {len(feats)} rows kept")
        try:
            if good:
                self._write(np.ascontiguousarray(keys[good]), np.ascontiguousarray(feats[good]),
                            np.ascontiguousarray(digests[good]))
        except OSError as err:  # a read-only store: the good rows are still not trusted without a checksum
            log.info("feature store: cannot rewrite the salvaged rows of %s: %s", path, err)
            return
        remove(path)

    # ---- writing ------------------------------------------------------------------------------
    def put(self, keys: Sequence[str], rows: torch.Tensor | np.ndarray) -> None:
        """Append ``rows`` (N, D) under ``keys`` as one new segment (atomic), leaving out keys the store
        already holds; merge segments past the limit. Raises OSError when the folder cannot be written
        (the caller decides what that means)."""
        rows = np.ascontiguousarray(rows.detach().cpu().float().numpy() if torch.is_tensor(rows) else rows,
                                    dtype=np.float32)
        if rows.shape != (len(keys), self.dim):
            raise ValueError(f"feature store: {len(keys)} keys but rows of shape {rows.shape} (expected (N, {self.dim}))")
        if not len(keys):
            return
        with self._lock:
            self.refresh()  # rows another writer stored meanwhile are not stored twice
            new = [i for i, k in enumerate(keys) if bytes.fromhex(k) not in self._index]
            if not new:
                return
            rows = rows[new]
            binary = np.frombuffer(b"".join(bytes.fromhex(keys[i]) for i in new), dtype=np.uint8).reshape(-1, KEY_BYTES)
            digests = np.frombuffer(b"".join(_row_digest(k, r) for k, r in zip(binary, rows)),
                                    dtype=np.uint8).reshape(-1, DIGEST_BYTES)
            self._write(binary, rows, digests)
            self.compact()

    def _write(self, keys: np.ndarray, feats: np.ndarray, digests: np.ndarray, name: str | None = None) -> Path:
        from safetensors.numpy import save

        meta = {"format": FORMAT, "weights": self.weights, "rows": str(len(feats)), "dim": str(self.dim),
                "sha256": _sha256(keys, feats, digests)}
        data = save({"keys": keys, "features": feats, "row_digest": digests}, metadata=meta)
        # Names sort by creation time, so the oldest copy of a key wins in every process.
        path = self.folder / (name or f"seg-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.safetensors")
        atomic_write_bytes(path, data)  # a temporary ".seg-*.tmp" renamed into place
        self.files_written += 1
        self._verified.add(path.name)
        self._open(path)
        return path

    def compact(self, limit: int = MAX_SEGMENTS) -> int:
        """Merge the smaller half of the segments into one when there are more than ``limit``; returns the
        number of files removed. Safe beside readers, writers and compactions in other processes: the merged
        segment is in place before the old ones go, and it keeps every key of its members (one copy each, the
        oldest among them) whatever other segments hold, since another process may be removing those at the
        same moment. It is named where its oldest member sorted, so keys resolve as before (a key copied into
        segments outside the merge, by two writers without the encode lock, may then resolve to a copy of
        another age: such copies differ in their last bits at most)."""
        with self._lock:
            self.refresh()
            live = [seg for seg in self._segments if seg.path.name not in self._undeletable]
            if len(live) <= limit:
                return 0
            small = sorted(sorted(live, key=lambda seg: seg.rows)[: max(2, len(live) // 2)],
                           key=lambda seg: seg.path.name)
            keys = np.concatenate([seg.keys for seg in small])  # oldest member first
            _, first = np.unique(keys, axis=0, return_index=True)
            first.sort()  # one copy of each key: its first, i.e. oldest, occurrence
            self._write(keys[first], np.concatenate([seg.features for seg in small])[first],
                        np.concatenate([seg.digests for seg in small])[first],
                        # right after its oldest member; unique, as two processes may merge that member at once
                        name=small[0].path.name.replace(".safetensors", f"-m{uuid.uuid4().hex[:12]}.safetensors"))
            paths = [seg.path for seg in small]
            del small, live
            self._reset()  # let go of this process's mappings before removing the files
            for path in paths:
                if not remove(path):
                    self._undeletable.add(path.name)
            _remove_stale_temporaries(self.folder)
            self.refresh()
            return len(paths)

    def files(self) -> list[Path]:
        return self._listing()


def _map(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The metadata and memory-mapped tensors of a safetensors file (read-only; no copy, no pickle)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(handle.read(length))
    meta = header.pop("__metadata__", None) or {}
    dtypes = {"F32": np.float32, "U8": np.uint8}
    base = 8 + length
    whole = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)  # one mapping
    tensors = {}
    for name, spec in header.items():
        start, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        dtype = np.dtype(dtypes[spec["dtype"]])
        if base + end > size or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
        tensors[name] = whole[base + start : base + end].view(dtype).reshape(shape)
    return meta, tensors


def _sha256(keys: np.ndarray, feats: np.ndarray, digests: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in (keys, feats, digests):
        h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return h.hexdigest()


def _row_digest(key: np.ndarray | bytes, row: np.ndarray) -> bytes:
    return hashlib.sha256(bytes(key) + np.ascontiguousarray(row, dtype=np.float32).tobytes()).digest()[:DIGEST_BYTES]


def _damage_note(folder: Path, path: Path, why: str) -> None:
    damage_note(folder.parent.parent, path, why)


def damage_note(root: Path, path: Path, why: str) -> None:
    """One note per cache root that damaged entries are recomputed (the first one named), each in the log."""
    note(f"feature cache: recomputing damaged entries under {root} (first: {path.name}: {why})", key=f"damaged:{root}")
    log.info("feature cache: discarding %s (%s)", path, why)


def remove(path: Path) -> bool:
    try:
        path.unlink(missing_ok=True)
        return True
    except OSError as err:  # a read-only folder, or a file another process maps (Windows)
        log.info("feature store: cannot remove %s: %s", path, err)
        return False


def _remove_stale_temporaries(folder: Path, older_than: float = 3600.0) -> None:
    """Temporary files of writers killed before their rename (never read; removed after an hour)."""
    now = time.time()
    for tmp in folder.glob(".seg-*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
        except OSError:
            pass

