"""Image folders and the data config: layouts, class names, templates and every bad-input case."""

from __future__ import annotations

import logging
import pickle

import pytest

from calibprompt.data import DataError, Sample, open_dataset
from tests.test_data_helpers import make_tree, noise, save


def folder(path, **extra):
    return {"source": "folder", "path": str(path), **extra}


def test_flat_folder_labels_follow_alphabetical_folder_order(tmp_path):
    make_tree(tmp_path, {"tumour": 2, "Normal_tissue": 3, "b": 1})
    ds = open_dataset(folder(tmp_path))
    assert ds.classnames == ["Normal tissue", "b", "tumour"]  # sorted folders, _ -> space
    assert ds.counts() == {"": [3, 1, 2]}
    assert not ds.has_split and ds.name == tmp_path.name
    assert ds.template == "An image of {}."
    assert Sample("Normal_tissue/img0.png", 0, "") in ds.samples
    image = ds.load("tumour/img1.png")
    assert image.mode == "RGB" and image.size == (12, 12)
    assert len(ds.content_hash("b/img0.png")) == 64


def test_split_folder_with_classnames_txt_and_template(tmp_path):
    for split in ("train", "val", "test"):
        make_tree(tmp_path, {"neg": 2, "pos": 2}, split=split)
    (tmp_path / "classnames.txt").write_text("pos malignant_tumour\nneg benign tissue\n")
    ds = open_dataset(folder(tmp_path, template="A photo of {}."))
    assert ds.classnames == ["benign tissue", "malignant tumour"]
    assert ds.counts() == {"train": [2, 2], "val": [2, 2], "test": [2, 2]}
    assert ds.get("val/pos/img1.png") == Sample("val/pos/img1.png", 1, "val")
    assert ds.prompts() == ["A photo of benign tissue.", "A photo of malignant tumour."]


def test_baple_layout_and_name_template(tmp_path):
    root = tmp_path / "covid"
    for split in ("train", "test"):
        make_tree(root / "images", {"covid": 1, "normal": 1}, split=split)
    ds = open_dataset(folder(root))
    assert ds.counts() == {"train": [1, 1], "test": [1, 1]}
    assert ds.template == "A chest X-ray image of {} patient"  # official lookup by dataset name
    assert "train/covid/img0.png" in ds


def test_classnames_override_list_dict_and_file(tmp_path):
    make_tree(tmp_path / "d", {"a": 1, "b": 1})
    assert open_dataset(folder(tmp_path / "d", classnames=["x ray", "y_z"])).classnames == ["x ray", "y z"]
    by_folder = open_dataset(folder(tmp_path / "d", classnames={"b": "bee", "a": "ant"}))
    assert by_folder.classnames == ["ant", "bee"]
    (tmp_path / "names.txt").write_text("a alpha\nb beta\n")
    from_file = open_dataset(folder(tmp_path / "d", classnames=str(tmp_path / "names.txt")))
    assert from_file.classnames == ["alpha", "beta"]
    with pytest.raises(DataError, match="lists 3 names but the data has 2 classes"):
        open_dataset(folder(tmp_path / "d", classnames=["x", "y", "z"]))


def test_relative_path_resolves_against_cwd(tmp_path, monkeypatch):
    make_tree(tmp_path / "data", {"a": 1, "b": 1})
    monkeypatch.chdir(tmp_path)
    assert len(open_dataset({"source": "folder", "path": "data"})) == 2


def test_unknown_and_misplaced_keys(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match=r"unknown key 'shots'.*valid keys: \['source', 'path'"):
        open_dataset(folder(tmp_path, shots=8))
    with pytest.raises(DataError, match="unknown key 'label_column'.*applies to source csv"):
        open_dataset(folder(tmp_path, label_column="y"))
    with pytest.raises(DataError, match="source must be one of"):
        open_dataset({"source": "zip", "path": str(tmp_path)})
    with pytest.raises(DataError, match="verify must be one of"):
        open_dataset(folder(tmp_path, verify="sometimes"))
    with pytest.raises(DataError, match="template must be a string with exactly one"):
        open_dataset(folder(tmp_path, template="no placeholder"))
    assert isinstance(DataError("x"), ValueError)
    # null values count as absent, so a config may spell out every key
    assert len(open_dataset(folder(tmp_path, name=None, template=None, skip_bad=None))) == 2


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"folder .*nowhere does not exist"):
        open_dataset(folder(tmp_path / "nowhere"))


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*/b is empty"):
        open_dataset(folder(tmp_path))


def test_classnames_txt_without_folder_and_folder_without_line(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "classnames.txt").write_text("a alpha\nb beta\nc gamma\n")
    with pytest.raises(DataError, match=r"names class\(es\) \['c'\] with no images"):
        open_dataset(folder(tmp_path))
    (tmp_path / "classnames.txt").write_text("a alpha\n")
    with pytest.raises(DataError, match=r"\['b'\] found in the data are missing from .*classnames.txt"):
        open_dataset(folder(tmp_path))
    (tmp_path / "classnames.txt").write_text("a\n")
    with pytest.raises(DataError, match="line 1: expected '<class_folder> <class name text>'"):
        open_dataset(folder(tmp_path))


def test_split_layout_errors(tmp_path):
    make_tree(tmp_path / "mixed", {"a": 1}, split="train")
    make_tree(tmp_path / "mixed", {"a": 1}, split="test")
    make_tree(tmp_path / "mixed", {"extra": 1})
    with pytest.raises(DataError, match="mixes split and class folders"):
        open_dataset(folder(tmp_path / "mixed"))
    make_tree(tmp_path / "trainonly", {"a": 1}, split="train")
    with pytest.raises(DataError, match=r"has split folders \['train'\] but needs both train/ and test/"):
        open_dataset(folder(tmp_path / "trainonly"))
    make_tree(tmp_path / "uneven", {"a": 1, "b": 1}, split="train")
    make_tree(tmp_path / "uneven", {"a": 1}, split="test")
    with pytest.raises(DataError, match=r"test lacks class folder\(s\) \['b'\]"):
        open_dataset(folder(tmp_path / "uneven"))
    make_tree(tmp_path / "nested", {"a": 1})
    save(tmp_path / "nested" / "a" / "deeper" / "x.png", noise("x"))
    with pytest.raises(DataError, match="contains the sub-folder 'deeper'"):
        open_dataset(folder(tmp_path / "nested"))
    make_tree(tmp_path / "split", {"a": 1}, split="train")
    make_tree(tmp_path / "split", {"a": 1}, split="test")
    with pytest.raises(DataError, match="test_fraction applies only to sources without"):
        open_dataset(folder(tmp_path / "split", test_fraction=0.2))


def test_corrupt_images_fail_at_open_or_are_skipped(tmp_path, caplog):
    make_tree(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "a" / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "b" / "img0.png").read_bytes()
    (tmp_path / "b" / "half.png").write_bytes(good[: len(good) // 2])
    jpeg = save(tmp_path / "a" / "cut.jpg", noise("j", size=(64, 64)), quality=90).read_bytes()
    (tmp_path / "a" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(DataError) as err:
        open_dataset(folder(tmp_path))
    text = str(err.value)
    assert "3 unreadable image(s)" in text and "a/garbage.png" in text and "b/half.png" in text
    assert "a/cut.jpg" in text and "skip_bad: true" in text

    with caplog.at_level(logging.WARNING, logger="calibprompt.data"):
        ds = open_dataset(folder(tmp_path, skip_bad=True))
    assert sorted(ref for ref, _ in ds.skipped) == ["a/cut.jpg", "a/garbage.png", "b/half.png"]
    assert ds.counts() == {"": [3, 2]}
    assert "skipped 3 unreadable image(s)" in caplog.text
    # the quick check still catches files that are not images at all
    with pytest.raises(DataError, match="garbage.png"):
        open_dataset(folder(tmp_path, verify="quick"))


def test_skip_bad_that_empties_a_class_is_an_error(tmp_path):
    make_tree(tmp_path, {"a": 2})
    save(tmp_path / "b" / "x.png", noise("x"))
    (tmp_path / "b" / "x.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"class 1 \('b'\) has no images after skipping 1 unreadable"):
        open_dataset(folder(tmp_path, skip_bad=True))


def test_non_image_files_are_ignored_and_reported(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "a" / "notes.txt").write_text("hello")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"x")
    save(tmp_path / "stray.png", noise("s"))
    ds = open_dataset(folder(tmp_path))
    assert sorted(ds.ignored) == ["a/notes.txt", "stray.png"]
    assert len(ds) == 2


def test_verify_none_defers_decoding(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "b" / "bad.png").write_bytes(b"junk")
    ds = open_dataset(folder(tmp_path, verify="none"))
    assert len(ds) == 3
    with pytest.raises(DataError, match=r"cannot read image 'b/bad.png'"):
        ds.load("b/bad.png")


def test_datasets_pickle_for_loader_workers(tmp_path):
    make_tree(tmp_path, {"a": 1, "b": 1})
    ds = open_dataset(folder(tmp_path))
    ds.content_hash("a/img0.png")
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.content_hash("a/img0.png") == ds.content_hash("a/img0.png")
    assert copy.load("b/img0.png").tobytes() == ds.load("b/img0.png").tobytes()
