"""Faults 3 and 7 (docs/reliability.md): a damaged feature cache, a full disk under it, and weights or
images replaced at the same path -- each detected, never silently reused."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.config import load_config
from calibprompt.engine.run import run
from calibprompt.features import FeatureCache
from tests.reliability.conftest import write_config
from tests.random_models import write_random_open_clip
from tests.tiny_models import TINY_CLIP, write_image_folder


def _cfg(tmp_path, model, images, **extra):
    return load_config(write_config(tmp_path / "c.yaml", model, images, **extra))


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def _feature_bytes(path: Path) -> tuple[int, int]:
    """(offset, bytes per row) of the ``features`` tensor inside a store segment (safetensors layout)."""
    import json
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    spec = json.loads(data[8 : 8 + length])["features"]
    return 8 + length + spec["data_offsets"][0], spec["shape"][1] * 4


@pytest.mark.parametrize("damage, recomputed", [("truncate", "all"), ("flip", 1), ("swap", 2), ("foreign", "all")])
def test_damaged_cache_entries_are_recomputed_with_one_note(damage, recomputed, tmp_path, model, images, caplog):
    cache_root = tmp_path / "cache"
    first = run(_cfg(tmp_path, model, images), tmp_path / "a", quiet=True, cache=FeatureCache(cache_root))
    files = _entries(cache_root)
    assert len(files) == 1 and first["images_encoded"] > 2  # one run, one segment
    segment = files[0]
    data = bytearray(segment.read_bytes())
    start, row = _feature_bytes(segment)
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[start + row + 5] ^= 0x01  # inside row 1's bytes: only the checksums can tell
    elif damage == "swap":  # rows 0 and 1 exchanged: each row's digest binds it to its key
        data[start : start + 2 * row] = data[start + row : start + 2 * row] + data[start : start + row]
    else:  # a segment of another model's store under this model's folder
        other = write_random_open_clip(tmp_path / "other", TINY_CLIP, seed=7)
        run(_cfg(tmp_path, other, images), tmp_path / "o", quiet=True, cache=FeatureCache(tmp_path / "c2"))
        data = bytearray(_entries(tmp_path / "c2")[0].read_bytes())
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        second = run(_cfg(tmp_path, model, images), tmp_path / "b", quiet=True, cache=FeatureCache(cache_root))
    expected = first["images_encoded"] if recomputed == "all" else recomputed
    assert second["images_encoded"] == expected  # exactly the damaged rows, recomputed
    assert np.allclose(second["metrics"]["ece"], first["metrics"]["ece"])
    notes = [r.getMessage() for r in caplog.records if "recomputing damaged entries" in r.getMessage()]
    assert len(notes) == 1 and segment.name in notes[0]
    third = FeatureCache(cache_root)  # what is left is whole: nothing more to recompute, no note
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        assert run(_cfg(tmp_path, model, images), tmp_path / "c", quiet=True, cache=third)["images_encoded"] == 0
    assert not [r for r in caplog.records if "recomputing damaged" in r.getMessage()]


def test_other_models_features_are_never_used(tmp_path, model, images):
    cache_root = tmp_path / "cache"
    run(_cfg(tmp_path, model, images), tmp_path / "a", quiet=True, cache=FeatureCache(cache_root))
    other = write_random_open_clip(tmp_path / "other", TINY_CLIP, seed=7)  # other weights: other keys
    result = run(_cfg(tmp_path, other, images), tmp_path / "b", quiet=True, cache=FeatureCache(cache_root))
    assert result["images_encoded"] > 0


def test_changed_image_at_the_same_path_is_encoded_again(tmp_path, model):
    images = write_image_folder(tmp_path / "img", n_train=6, n_test=4)
    cache_root = tmp_path / "cache"
    run(_cfg(tmp_path, model, images), tmp_path / "a", quiet=True, cache=FeatureCache(cache_root))
    target = sorted((images / "test" / "normal").iterdir())[0]
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(target)
    result = run(_cfg(tmp_path, model, images), tmp_path / "b", quiet=True, cache=FeatureCache(cache_root))
    assert result["images_encoded"] == 1  # the changed image only: its content key is new


def test_full_disk_under_the_cache_does_not_fail_the_run(tmp_path, model, images, monkeypatch, caplog):
    import calibprompt.features.store as store_module

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "atomic_write_bytes", full)
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        result = run(_cfg(tmp_path, model, images), tmp_path / "a", quiet=True,
                     cache=FeatureCache(tmp_path / "cache"))
    assert result["status"] == "done"
    notes = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(notes) == 1 and str(tmp_path / "cache") in notes[0] and "No space left" in notes[0]
    assert not _entries(tmp_path / "cache")


def test_replaced_weights_or_images_at_the_same_path_are_not_reused(tmp_path, model, caplog):
    weights_dir = tmp_path / "weights"
    shutil.copytree(model, weights_dir)
    images = write_image_folder(tmp_path / "img", n_train=6, n_test=4)
    cfg = _cfg(tmp_path, weights_dir, images)
    out = tmp_path / "run"
    first = run(cfg, out, quiet=True)
    assert run(cfg, out, quiet=True)["timings"] == first["timings"]  # unchanged inputs: reused as is
    other = write_random_open_clip(tmp_path / "other", TINY_CLIP, seed=7)
    for f in other.iterdir():  # new weights at the same path
        shutil.copyfile(f, weights_dir / f.name)
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        second = run(cfg, out, quiet=True)
    assert second["backbone_info"]["fingerprint"] != first["backbone_info"]["fingerprint"]
    assert any("weight files" in r.getMessage() for r in caplog.records)
    target = sorted((images / "train" / "tumor").iterdir())[0]
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(target)  # new image content at the same path
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        third = run(cfg, out, quiet=True)
    assert third["inputs"]["data"] != second["inputs"]["data"]
    assert any("images or labels" in r.getMessage() for r in caplog.records)
    assert torch.is_tensor(torch.tensor(third["metrics"]["ece"]))
