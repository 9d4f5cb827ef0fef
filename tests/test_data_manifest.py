"""CSV/TSV manifests: label forms, splits, paths and every bad-input case."""

from __future__ import annotations

import pytest

from calibprompt.data import DataError, open_dataset
from tests.test_data_helpers import make_tree, noise, save


@pytest.fixture()
def images(tmp_path):
    make_tree(tmp_path / "imgs", {"cat": 3, "dog": 3})
    return tmp_path


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_cfg(path, **extra):
    return {"source": "csv", "path": str(path), **extra}


def test_string_labels_and_split_column(images):
    rows = ["path,label,split"] + [f"imgs/{c}/img{i}.png,{c},{'test' if i == 2 else 'Train'}"
                                   for c in ("dog", "cat") for i in range(3)]
    ds = open_dataset(csv_cfg(write(images / "m.csv", rows)))
    assert ds.classnames == ["cat", "dog"]  # alphabetical label order
    assert ds.counts() == {"train": [2, 2], "test": [1, 1]}
    assert ds.get("imgs/dog/img2.png").split == "test" and ds.get("imgs/dog/img2.png").label == 1
    assert ds.name == "m" and ds.source == "csv"
    assert ds.load("imgs/cat/img0.png").mode == "RGB"


def test_classnames_list_sets_label_order(images):
    rows = ["path,label"] + [f"imgs/{c}/img{i}.png,{c}" for c in ("cat", "dog") for i in range(3)]
    ds = open_dataset(csv_cfg(write(images / "m.csv", rows), classnames=["dog", "cat"], test_fraction=0.3))
    assert ds.classnames == ["dog", "cat"]
    assert ds.get("imgs/dog/img0.png").label == 0 and ds.test_fraction == 0.3


def test_integer_labels_tsv_and_custom_columns(images):
    rows = ["file\ty"] + [f"imgs/{c}/img{i}.png\t{k}" for k, c in enumerate(("cat", "dog")) for i in range(3)]
    ds = open_dataset(csv_cfg(write(images / "m.tsv", rows), path_column="file", label_column="y",
                              classnames=["a cat", "a_dog"]))
    assert ds.classnames == ["a cat", "a dog"] and ds.counts() == {"": [3, 3]}
    with pytest.raises(DataError, match="labels are integer indices, so data.classnames must give"):
        open_dataset(csv_cfg(images / "m.tsv", path_column="file", label_column="y"))


def test_paths_relative_to_manifest_folder(images, monkeypatch):
    sub = images / "lists"
    sub.mkdir()
    rows = ["path,label"] + [f"../imgs/cat/img{i}.png,cat" for i in range(2)] + [
        f"{images}/imgs/dog/img{i}.png,dog" for i in range(2)]
    monkeypatch.chdir(images / "imgs")  # the working directory must not matter for rows
    ds = open_dataset(csv_cfg(write(sub / "m.csv", rows)))
    assert "../imgs/cat/img0.png" in ds and f"{images}/imgs/dog/img1.png" in ds


def test_missing_columns(images):
    path = write(images / "m.csv", ["file,label", "imgs/cat/img0.png,cat"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['path'\]; the header is \['file', 'label'\]"):
        open_dataset(csv_cfg(path))
    with pytest.raises(DataError, match=r"missing column\(s\) \['fold'\]"):
        open_dataset(csv_cfg(path, path_column="file", split_column="fold"))


def test_duplicate_paths(images):
    path = write(images / "m.csv", ["path,label", "imgs/cat/img0.png,cat", "imgs/dog/img0.png,dog",
                                    "./imgs/cat/img0.png,dog"])
    with pytest.raises(DataError, match=r"line 4: duplicate path './imgs/cat/img0.png' \(also on line 2\)"):
        open_dataset(csv_cfg(path))


def test_unknown_and_out_of_range_labels(images):
    path = write(images / "m.csv", ["path,label", "imgs/cat/img0.png,cat", "imgs/dog/img0.png,wolf"])
    with pytest.raises(DataError, match=r"line 3: unknown label 'wolf'; the classes are \['cat', 'dog'\]"):
        open_dataset(csv_cfg(path, classnames=["cat", "dog"]))
    path = write(images / "n.csv", ["path,label", "imgs/cat/img0.png,0", "imgs/dog/img0.png,2"])
    with pytest.raises(DataError, match=r"line 3: label 2 is out of range; there are 2 classes \(0..1\)"):
        open_dataset(csv_cfg(path, classnames=["cat", "dog"]))


def test_missing_files_fail_or_are_skipped(images):
    rows = ["path,label", "imgs/cat/img0.png,cat", "imgs/cat/gone.png,cat", "imgs/dog/img0.png,dog"]
    path = write(images / "m.csv", rows)
    with pytest.raises(DataError, match=r"imgs/cat/gone.png .*file not found"):
        open_dataset(csv_cfg(path))
    ds = open_dataset(csv_cfg(path, skip_bad=True))
    assert ds.skipped == [("imgs/cat/gone.png", "file not found")] and len(ds) == 2


def test_bad_split_values_and_empty_cells(images):
    path = write(images / "m.csv", ["path,label,split", "imgs/cat/img0.png,cat,train",
                                    "imgs/dog/img0.png,dog,holdout"])
    with pytest.raises(DataError, match="line 3: split 'holdout' is not one of train, val, test"):
        open_dataset(csv_cfg(path))
    path = write(images / "n.csv", ["path,label", "imgs/cat/img0.png,", "imgs/dog/img0.png,dog"])
    with pytest.raises(DataError, match="line 2: empty 'label'"):
        open_dataset(csv_cfg(path))
    path = write(images / "o.csv", ["path,label,split", "imgs/cat/img0.png,cat,train",
                                    "imgs/dog/img0.png,dog,train"])
    with pytest.raises(DataError, match="must give both train and test rows"):
        open_dataset(csv_cfg(path))


def test_corrupt_image_in_manifest(images):
    save(images / "imgs" / "dog" / "bad.png", noise("b"))
    (images / "imgs" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    path = write(images / "m.csv", ["path,label", "imgs/cat/img0.png,cat", "imgs/dog/bad.png,dog"])
    with pytest.raises(DataError, match=r"imgs/dog/bad.png .*corrupt"):
        open_dataset(csv_cfg(path))
