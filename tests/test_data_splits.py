"""Few-shot splits: determinism, order independence, validation shots, held-out test sets, JSON."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest

from calibprompt.data import DataError, FewShotSplit, make_split, open_dataset
from tests.conftest import require_shared
from tests.test_data_helpers import make_tree, noise, save


def split_folder(root, n=12, classes=("a", "b"), val=0):
    for split, count in (("train", n), ("test", 3), ("val", val)):
        if count:
            make_tree(root, {c: count for c in classes}, split=split)
    return open_dataset({"source": "folder", "path": str(root)})


def chosen_content(ds, split):
    return sorted(ds.content_hash(r) for r in split.train), sorted(ds.content_hash(r) for r in split.val)


def test_same_inputs_same_split_and_seed_changes_it(tmp_path):
    ds = split_folder(tmp_path / "d", n=30)
    a = make_split(ds, shots=4, seed=1)
    b = make_split(open_dataset({"source": "folder", "path": str(tmp_path / "d")}), shots=4, seed=1)
    assert a.train == b.train and a.test == b.test and len(a.train) == 8
    assert [ds.get(r).label for r in a.train] == [0] * 4 + [1] * 4
    assert all(ds.get(r).split == "train" for r in a.train)
    assert a.test == sorted(s.ref for s in ds.samples_in("test"))
    c = make_split(ds, shots=4, seed=2)
    assert set(c.train) != set(a.train)
    assert a.fingerprint == ds.fingerprint() and a.val_source == "none"


def test_independent_of_listing_order_and_file_names(tmp_path):
    ds = split_folder(tmp_path / "d", n=20)
    reference = make_split(ds, shots=5, seed=3, val_shots=2)
    shuffled = list(ds.samples)
    random.Random(7).shuffle(shuffled)
    ds.samples = shuffled
    again = make_split(ds, shots=5, seed=3, val_shots=2)
    assert again.train == reference.train and again.val == reference.val

    # the same images, created in reverse order under other names
    other = tmp_path / "e"
    files = sorted((tmp_path / "d").rglob("*.png"))
    for i, f in enumerate(reversed(files)):
        rel = f.relative_to(tmp_path / "d")
        target = other / rel.parent / f"renamed_{i:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    ds2 = open_dataset({"source": "folder", "path": str(other)})
    moved = make_split(ds2, shots=5, seed=3, val_shots=2)
    assert chosen_content(ds2, moved) == chosen_content(ds, reference)
    assert moved.train != reference.train  # refs differ, content is the same


def test_validation_shots_from_train_pool_are_disjoint_and_keep_training_shots(tmp_path):
    ds = split_folder(tmp_path / "d", n=12)
    plain = make_split(ds, shots=4, seed=1)
    with_val = make_split(ds, shots=4, seed=1, val_shots=3)
    assert with_val.train == plain.train
    assert len(with_val.val) == 6 and not set(with_val.val) & set(with_val.train)
    assert all(ds.get(r).split == "train" for r in with_val.val) and with_val.val_source == "train"
    assert [s.label for s in with_val.samples_for("val")] == [0, 0, 0, 1, 1, 1]


def test_validation_shots_from_source_val_split(tmp_path):
    ds = split_folder(tmp_path / "d", n=6, val=4)
    sp = make_split(ds, shots=2, seed=1, val_shots=2)
    assert sp.val_source == "val" and all(ds.get(r).split == "val" for r in sp.val) and len(sp.val) == 4
    mm = open_dataset({"source": "medmnist", "path": str(require_shared("medmnist/breastmnist.npz"))})
    sp = make_split(mm, shots=8, seed=1, val_shots=4)
    assert len(sp.train) == 16 and all(r.startswith("train/") for r in sp.train)
    assert len(sp.val) == 8 and all(r.startswith("val/") for r in sp.val) and len(sp.test) == 156


def test_too_few_images_for_shots(tmp_path):
    ds = split_folder(tmp_path / "d", n=5)
    with pytest.raises(DataError, match=r"class 0 \('a'\) has 5 distinct training image\(s\) but shots = 8"):
        make_split(ds, shots=8, seed=1)
    with pytest.raises(DataError, match=r"has 5 distinct training image\(s\) but shots \+ val_shots = 6"):
        make_split(ds, shots=4, seed=1, val_shots=2)
    with pytest.raises(DataError, match="shots must be a non-negative integer"):
        make_split(ds, shots=-1, seed=1)
    assert make_split(ds, shots=0, seed=1).train == []  # zero-shot runs


def test_held_out_test_fraction_for_unsplit_sources(tmp_path):
    make_tree(tmp_path / "d", {"a": 20, "b": 10})
    dup = tmp_path / "d" / "a" / "img0.png"
    shutil.copyfile(dup, tmp_path / "d" / "a" / "copy_of_img0.png")
    ds = open_dataset({"source": "folder", "path": str(tmp_path / "d")})
    with pytest.raises(DataError, match="has no train/test split; set data.test_fraction"):
        make_split(ds, shots=2, seed=1)
    a = make_split(ds, shots=2, seed=1, test_fraction=0.3)
    b = make_split(ds, shots=2, seed=9, test_fraction=0.3)
    assert a.test == b.test  # the test set does not depend on the seed
    labels = [ds.get(r).label for r in a.test]
    assert labels.count(1) == 3 and labels.count(0) in (6, 7)
    side = {r: ("test" if r in a.test else "pool") for r in ("a/img0.png", "a/copy_of_img0.png")}
    assert side["a/img0.png"] == side["a/copy_of_img0.png"]  # identical content never straddles
    assert not set(a.train) & set(a.test) and a.test_fraction == 0.3
    configured = open_dataset({"source": "folder", "path": str(tmp_path / "d"), "test_fraction": 0.3})
    assert make_split(configured, shots=2, seed=1).test == a.test


def test_json_round_trip(tmp_path):
    ds = split_folder(tmp_path / "d", n=10)
    sp = make_split(ds, shots=3, seed=4, val_shots=2)
    sp.to_json(tmp_path / "out" / "split.json")
    data = json.loads((tmp_path / "out" / "split.json").read_text())
    assert data["format"] == "calibprompt.split/1" and data["shots"] == 3 and data["seed"] == 4
    assert data["train"][0] == {"ref": sp.train[0], "label": ds.get(sp.train[0]).label,
                                "sha256": ds.content_hash(sp.train[0])}
    back = FewShotSplit.from_json(tmp_path / "out" / "split.json", ds)
    assert (back.train, back.val, back.test) == (sp.train, sp.val, sp.test)
    assert (back.shots, back.seed, back.val_shots, back.fingerprint) == (3, 4, 2, ds.fingerprint())
    assert back.samples_for("train") == [ds.get(r) for r in sp.train]
    # a hand-written split may list bare refs
    (tmp_path / "hand.json").write_text(json.dumps({"train": sp.train[:2], "test": sp.test}))
    assert FewShotSplit.from_json(tmp_path / "hand.json", ds).train == sp.train[:2]


def test_tampered_split_files_are_rejected(tmp_path):
    ds = split_folder(tmp_path / "d", n=10)
    sp = make_split(ds, shots=3, seed=4)
    path = tmp_path / "split.json"
    sp.to_json(path)
    good = json.loads(path.read_text())

    def load(mutate):
        data = json.loads(json.dumps(good))
        mutate(data)
        path.write_text(json.dumps(data))
        return FewShotSplit.from_json(path, ds)

    with pytest.raises(DataError, match=r"has label 1 in the file but 0 in the dataset"):
        load(lambda d: d["train"][0].update(label=1))
    with pytest.raises(DataError, match=r"'train/a/nope.png' is not in dataset"):
        load(lambda d: d["train"][0].update(ref="train/a/nope.png"))
    with pytest.raises(DataError, match="is listed in both train and test"):
        load(lambda d: d["test"].append(d["train"][0]))
    with pytest.raises(DataError, match="the content of .* changed"):
        load(lambda d: d["train"][0].update(sha256="0" * 64))
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        FewShotSplit.from_json(path, ds)
    with pytest.raises(DataError, match="does not exist"):
        FewShotSplit.from_json(tmp_path / "absent.json", ds)


def test_changed_dataset_warns_but_checks_listed_images(tmp_path):
    ds = split_folder(tmp_path / "d", n=6)
    sp = make_split(ds, shots=2, seed=1)
    sp.to_json(tmp_path / "s.json")
    save(tmp_path / "d" / "train" / "a" / "new.png", noise("new"))
    grown = open_dataset({"source": "folder", "path": str(tmp_path / "d")})
    with pytest.warns(UserWarning, match="fingerprint differs"):
        assert FewShotSplit.from_json(tmp_path / "s.json", grown).train == sp.train
    chosen = tmp_path / "d" / sp.train[0]
    save(chosen, noise("replaced"))
    changed = open_dataset({"source": "folder", "path": str(tmp_path / "d")})
    with pytest.raises(DataError, match="changed since the split was made"):
        FewShotSplit.from_json(tmp_path / "s.json", changed)


def test_train_test_overlap_is_warned_and_counted(tmp_path):
    root = tmp_path / "d"
    make_tree(root, {"a": 1, "b": 1}, split="train")
    make_tree(root, {"a": 1, "b": 1}, split="test", tag="t")
    shutil.copyfile(root / "test" / "a" / "img0.png", root / "train" / "a" / "leak.png")
    ds = open_dataset({"source": "folder", "path": str(root)})
    assert ds.duplicates() == {"within": 1, "cross_split": 1}
    with pytest.warns(UserWarning, match="1 training/validation shot"):
        sp = make_split(ds, shots=1, seed=_seed_picking(ds))
    assert sp.overlap == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_split(ds, shots=1, seed=_seed_picking(ds, leak=False)).overlap == 0


def _seed_picking(ds, leak=True):
    """A seed whose single class-a shot is (or is not) the leaked image."""
    for seed in range(100):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            picked = make_split(ds, shots=1, seed=seed).train[0]
        if (picked == "train/a/leak.png") == leak:
            return seed
    raise AssertionError("no seed found")
