"""MedMNIST .npz files: the real shared files, and synthetic ones for sizes and unsupported subsets."""

from __future__ import annotations

import numpy as np
import pytest

from calibprompt.data import DataError, open_dataset
from calibprompt.data.medmnist import medmnist_info, parse_flag
from tests.conftest import require_shared


def mm(path, **extra):
    return {"source": "medmnist", "path": str(path), **extra}


def test_breastmnist_real_file():
    ds = open_dataset(mm(require_shared("medmnist/breastmnist.npz")))
    assert ds.name == "breastmnist"
    assert ds.classnames == ["malignant", "normal, benign"]
    assert ds.counts() == {"train": [147, 399], "val": [21, 57], "test": [42, 114]}
    image = ds.load("test/0")
    assert image.mode == "RGB" and image.size == (28, 28)
    arr = np.asarray(image)
    assert (arr[..., 0] == arr[..., 2]).all()  # grey repeated
    raw = np.load(require_shared("medmnist/breastmnist.npz"))["test_images"][0]
    assert np.array_equal(arr[..., 0], raw)
    assert ds.content_hash("test/0") == ds.content_hash(ds.get("test/0")) != ds.content_hash("test/1")


def test_pneumoniamnist_real_file_class_names_from_package():
    ds = open_dataset(mm(require_shared("medmnist/pneumoniamnist.npz")))
    info = medmnist_info()["pneumoniamnist"]["label"]
    assert ds.classnames == [info["0"], info["1"]] == ["normal", "pneumonia"]
    assert [sum(r) for r in ds.counts().values()] == [4708, 524, 624]
    assert ds.counts()["test"] == [234, 390]


def write_npz(path, n=6, size=28, channels=None, label_shape=1, classes=2, labels=None):
    rng = np.random.default_rng(0)
    shape = (n, size, size) + ((channels,) if channels else ())
    arrays = {}
    for split in ("train", "val", "test"):
        lab = np.arange(n) % classes if labels is None else labels
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = np.repeat(lab.reshape(-1, 1), label_shape, axis=1)
    np.savez_compressed(path, **arrays)
    return path


def test_size_suffix_and_rgb_subset(tmp_path):
    ds = open_dataset(mm(write_npz(tmp_path / "breastmnist_64.npz", size=64)))
    assert ds.classnames == ["malignant", "normal, benign"] and ds.load("train/0").size == (64, 64)
    path = write_npz(tmp_path / "b.npz", n=9, size=64, channels=3, classes=9)
    ds = open_dataset(mm(path, name="pathmnist_64"))
    assert len(ds.classnames) == 9 and ds.classnames[0] == "adipose"
    assert ds.load("val/3").mode == "RGB"
    with pytest.raises(DataError, match="the name says size 128 but the images are 28x28"):
        open_dataset(mm(write_npz(tmp_path / "breastmnist_128.npz")))
    assert parse_flag("OrganAMNIST_224") == ("organamnist", 224)


def test_array_hash_includes_shape(tmp_path):
    a = open_dataset(mm(write_npz(tmp_path / "breastmnist.npz", size=28)))
    b = open_dataset(mm(write_npz(tmp_path / "x.npz", size=28), name="breastmnist"))
    assert a.content_hash("train/0") == b.content_hash("train/0")
    assert a.fingerprint() == b.fingerprint()
    flat = np.zeros((2, 4, 4), np.uint8)
    from calibprompt.data.base import hash_array
    assert hash_array(flat[0]) != hash_array(flat[0].reshape(2, 8))


def test_unsupported_subsets_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="chestmnist is multi-label"):
        open_dataset(mm(write_npz(tmp_path / "chestmnist.npz", label_shape=14)))
    with pytest.raises(DataError, match="3D volumes"):
        open_dataset(mm(write_npz(tmp_path / "organmnist3d.npz", channels=28, classes=11)))
    with pytest.raises(DataError, match="nor the file name 'mystery.npz' is a MedMNIST flag"):
        open_dataset(mm(write_npz(tmp_path / "mystery.npz")))
    named = open_dataset(mm(write_npz(tmp_path / "breastmnist_64.npz", size=64), name="my breasts"))
    assert named.name == "my breasts" and named.classnames[0] == "malignant"  # flag from the file name
    ds = open_dataset(mm(tmp_path / "mystery.npz", classnames=["no", "yes"]))
    assert ds.classnames == ["no", "yes"]
    with pytest.raises(DataError, match=r"label 5, outside 0..1"):
        open_dataset(mm(write_npz(tmp_path / "breastmnist.npz", labels=np.array([0, 1, 5, 0, 1, 0]))))
    np.savez(tmp_path / "half.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="has train_images but no train_labels"):
        open_dataset(mm(tmp_path / "half.npz", name="breastmnist"))
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(mm(tmp_path / "absent.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read .* as a MedMNIST .npz file"):
        open_dataset(mm(tmp_path / "junk.npz", name="breastmnist"))


def test_ordinal_subset_is_multiclass(tmp_path):
    ds = open_dataset(mm(write_npz(tmp_path / "retinamnist.npz", channels=3, n=10, classes=5)))
    assert len(ds.classnames) == 5 and ds.counts()["train"] == [2, 2, 2, 2, 2]
