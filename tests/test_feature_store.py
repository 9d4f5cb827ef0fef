"""The sharded feature store (issue 18): rows by key in a few memory-mapped segments, appended atomically,
compacted, shared between processes, and older per-image caches moved into it."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from calibprompt.features import FeatureCache
from calibprompt.features.legacy import digest
from calibprompt.features.store import MAX_SEGMENTS, FeatureStore

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "ab" * 32


@pytest.fixture
def tiny_backbone(tmp_path):
    from calibprompt.backbones import load_backbone
    from tests.tiny_models import tiny_model_dir

    return load_backbone({"path": str(tiny_model_dir(tmp_path / "model", "clip"))})


@pytest.fixture
def tiny_dataset(tmp_path):
    from calibprompt.data import open_dataset
    from tests.tiny_models import write_image_folder

    return open_dataset({"source": "folder", "path": str(write_image_folder(tmp_path / "images", n_train=2, n_test=5))})


def _keys(start: int, n: int) -> list[str]:
    return [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(start, start + n)]


def test_rows_come_back_by_key_and_missing_ones_are_named(tmp_path):
    store = FeatureStore(tmp_path, WEIGHTS, 8)
    rows = torch.randn(5, 8)
    store.put(_keys(0, 5), rows)
    got, missing = FeatureStore(tmp_path, WEIGHTS, 8).get(_keys(3, 4))  # a new reader: from the files alone
    assert missing == [2, 3]
    assert torch.equal(got[:2], rows[3:5]) and not got[2:].any()
    assert len(store.files()) == 1


def test_compaction_bounds_the_files_and_keeps_every_row(tmp_path):
    store = FeatureStore(tmp_path, WEIGHTS, 4)
    rows = torch.randn(300, 4)
    for i in range(0, 300, 3):  # 100 appends of 3 rows
        store.put(_keys(i, 3), rows[i : i + 3])
    assert store.files_written > 100 and len(store.files()) <= MAX_SEGMENTS
    got, missing = FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 300))
    assert missing == [] and torch.equal(got, rows)
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_oldest_copy_of_a_key_wins_everywhere(tmp_path):
    first, second = torch.ones(1, 4), torch.full((1, 4), 2.0)
    older, stale = FeatureStore(tmp_path, WEIGHTS, 4), FeatureStore(tmp_path, WEIGHTS, 4)
    assert stale.get(_keys(0, 1))[1] == [0]  # looked before the older copy existed
    older.put(_keys(0, 1), first)
    older.put(_keys(0, 1), second)  # already held: not stored twice
    assert len(older.files()) == 1
    # a writer that missed the older copy (no encode lock) stores its own: the older one still wins on disk
    from calibprompt.features.store import KEY_BYTES, _row_digest
    import numpy as np

    key = np.frombuffer(bytes.fromhex(_keys(0, 1)[0]), dtype=np.uint8).reshape(1, KEY_BYTES)
    stale._write(key, second.numpy(), np.frombuffer(_row_digest(key[0], second.numpy()[0]), np.uint8).reshape(1, -1))
    for _ in range(3):  # more segments, so that a compaction merges the two copies
        stale.put(_keys(10 + _, 1), torch.zeros(1, 4))
    assert torch.equal(FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 1))[0], first)
    while stale.compact(limit=1):  # merge until one segment holds everything
        pass
    assert len(stale.files()) == 1
    fresh = FeatureStore(tmp_path, WEIGHTS, 4)
    assert len(fresh) == 4 and torch.equal(fresh.get(_keys(0, 1))[0], first)


def test_merged_segments_are_let_go_and_io_errors_delete_nothing(tmp_path, monkeypatch, caplog):
    import errno

    import calibprompt.features.store as store_module

    store = FeatureStore(tmp_path, WEIGHTS, 4)
    for i in range(60):
        store.put(_keys(i, 1), torch.randn(1, 4))
    assert len(store._segments) == len(store.files()) <= MAX_SEGMENTS  # no mapping of a removed file held
    files = store.files()

    def too_many_open_files(_path):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(store_module, "_map", too_many_open_files)
    assert FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 60))[1] == list(range(60))
    assert store.files() == files  # not the files' fault: nothing removed, no damage note
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    monkeypatch.undo()
    assert FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 60))[1] == []


def test_a_reader_sees_other_writers_and_survives_their_compaction(tmp_path):
    reader, writer = FeatureStore(tmp_path, WEIGHTS, 4), FeatureStore(tmp_path, WEIGHTS, 4)
    rows = torch.randn(40, 4)
    writer.put(_keys(0, 20), rows[:20])
    assert reader.get(_keys(0, 20))[1] == []  # opened (mapped) by the reader
    writer.put(_keys(20, 20), rows[20:])
    writer.compact(limit=1)  # both segments merged, the old files removed under the reader's mapping
    got, missing = reader.get(_keys(0, 40))
    assert missing == [] and torch.equal(got, rows)
    assert len(writer.files()) == 1


def test_a_segment_of_other_weights_or_width_is_never_read(tmp_path, caplog):
    FeatureStore(tmp_path, "cd" * 32, 4).put(_keys(0, 3), torch.randn(3, 4))
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        got, missing = FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 3))
    assert missing == [0, 1, 2]
    assert any("other weights" in r.getMessage() for r in caplog.records)
    FeatureStore(tmp_path, WEIGHTS, 4).put(_keys(0, 3), torch.randn(3, 4))
    assert FeatureStore(tmp_path, WEIGHTS, 8).get(_keys(0, 3))[1] == [0, 1, 2]  # 4-d rows for an 8-d model


def test_bad_rows_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"3 keys but rows of shape \(2, 4\)"):
        FeatureStore(tmp_path, WEIGHTS, 4).put(_keys(0, 3), torch.randn(2, 4))


_WRITER = """
import sys, hashlib, torch
from calibprompt.features.store import FeatureStore
folder, first = sys.argv[1], int(sys.argv[2])
store = FeatureStore(folder, "ab" * 32, 4)
for i in range(first, first + 60, 2):
    keys = [hashlib.sha256(f"image {j}".encode()).hexdigest() for j in (i, i + 1)]
    store.put(keys, torch.tensor([[float(j)] * 4 for j in (i, i + 1)]))
"""


def test_two_processes_append_and_compact_the_same_store(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(first)], cwd=ROOT)
             for first in (0, 60)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got, missing = FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 120))
    assert missing == []
    assert torch.equal(got, torch.arange(120.0)[:, None].expand(120, 4))
    assert len(list(tmp_path.glob("seg-*.safetensors"))) <= MAX_SEGMENTS + 1  # each writer compacts what it sees


def test_four_processes_merging_the_same_segments_lose_no_row(tmp_path, caplog):
    """Merges started at once by several writers take in the same oldest segment: each merged file has a
    name of its own (one replacing another lost the rows only it held, and a reader could map half of it)."""
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(first)], cwd=ROOT)
             for first in (0, 60, 120, 180)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0, 0, 0]
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        got, missing = FeatureStore(tmp_path, WEIGHTS, 4).get(_keys(0, 240))
    assert missing == []
    assert torch.equal(got, torch.arange(240.0)[:, None].expand(240, 4))
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]


def _write_per_image(root: Path, weights: str, key: str, feat: torch.Tensor, checksum: bool = True) -> Path:
    """An entry as calibprompt wrote them before the store: one safetensors file per feature."""
    path = root / weights[:16] / key[:2] / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, **({"sha256": digest(feat)} if checksum else {})}
    save_file({"feature": feat.contiguous()}, str(path), metadata=meta)
    return path


def test_per_image_caches_of_older_versions_are_moved_into_the_store(tmp_path, tiny_backbone, tiny_dataset, caplog):
    backbone, dataset = tiny_backbone, tiny_dataset
    samples = dataset.samples_in("test")
    fresh = FeatureCache(tmp_path / "fresh")
    expected = fresh.features(backbone, dataset, samples)
    weights = backbone.fingerprint()
    keys = [FeatureCache.key(weights, backbone.preprocess.describe(False), dataset.content_hash(s), None, 0)
            for s in samples]
    old = tmp_path / "old"
    files = [_write_per_image(old, weights, k, f, checksum=i > 0) for i, (k, f) in enumerate(zip(keys, expected))]
    cache = FeatureCache(old)
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        got = cache.features(backbone, dataset, samples)
    assert torch.equal(got, expected)
    assert cache.encoded == 1  # only the entry without a checksum is recomputed, as before
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "moving per-image entries" in messages and "no checksum" in messages
    assert not any(f.exists() for f in files) and not [p for p in (old / weights[:16]).iterdir() if len(p.name) == 2]
    again = FeatureCache(old)
    assert torch.equal(again.features(backbone, dataset, samples), expected) and again.encoded == 0
    assert len(list((old / weights[:16] / "store").glob("seg-*"))) == 2  # the moved rows, the recomputed one


def test_bench_cache_runs_and_reports_what_it_measured(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cache.py"), "--sizes", "300", "5000",
                           "--dim", "16", "--legacy", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == [300, 5000]
    assert all(r["identical"] and r["missing"] == 0 and r["read_s"] > 0 for r in rows)
    assert rows[1]["segments_written"] == 3 and rows[1]["files"] == 3  # 2,048-row flushes, under the merge limit
    assert rows[0]["legacy_files"] == 300 and rows[0]["files"] == 1
    assert "warm read" in done.stdout and "per-image layout" in done.stdout
