"""The paper datasets: their definitions, opening the prepared layout, and ``prepare`` on small
synthetic raw trees laid out like the public downloads."""

from __future__ import annotations

import csv
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from calibprompt.data import PAPER_DATASETS, DataError, default_template, open_dataset, prepare
from tests.test_data_helpers import make_tree, noise, save, write_dicom


def test_paper_definitions_match_the_method_spec():
    assert list(PAPER_DATASETS) == ["COVID", "RSNA18", "Kather", "PanNuke", "DigestPath"]
    kather = PAPER_DATASETS["Kather"]
    assert kather.class_folders == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert kather.classnames[6:] == ["normal colon mucosa", "cancer-associated stroma",
                                     "colorectal adenocarcinoma epithelium"]
    assert PAPER_DATASETS["RSNA18"].classnames == ["lung opacity", "no lung opacity, not normal", "normal"]
    assert PAPER_DATASETS["COVID"].template == "A chest X-ray image of {} patient"
    assert PAPER_DATASETS["PanNuke"].template == "An H&E image patch of {} skin tissue."
    assert PAPER_DATASETS["DigestPath"].template == "An H&E image patch of {} tissue."
    assert kather.template == "An H&E image of {}."
    for spec in PAPER_DATASETS.values():
        assert spec.class_folders == sorted(spec.class_folders)  # labels = alphabetical folder order
        assert default_template(spec.name) == default_template(spec.official) == spec.template
    assert default_template("anything") == "An image of {}."


def make_prepared(root, name, n=2):
    spec = PAPER_DATASETS[name]
    for split in ("train", "test"):
        make_tree(root / spec.folder / "images", {f: n for f in spec.class_folders}, split=split, tag=name)
    return root


def test_open_paper_dataset(tmp_path):
    root = make_prepared(tmp_path, "RSNA18")
    ds = open_dataset({"source": "paper", "path": str(root), "name": "rsna18"})
    assert ds.name == "RSNA18" and ds.source == "paper"
    assert ds.classnames == PAPER_DATASETS["RSNA18"].classnames
    assert ds.template == "A chest X-ray image of {} patient"
    assert ds.counts() == {"train": [2, 2, 2], "test": [2, 2, 2]}
    assert ds.get("train/no_lung_opacity_not_normal/img0.png").label == 1
    # the dataset folder itself works too
    assert len(open_dataset({"source": "paper", "path": str(root / "rsna18"), "name": "RSNA18"})) == 12


def test_open_paper_dataset_errors(tmp_path):
    with pytest.raises(DataError, match=r"no .*kather/images/ folder.*calibprompt data prepare Kather"):
        open_dataset({"source": "paper", "path": str(tmp_path), "name": "Kather"})
    with pytest.raises(DataError, match="unknown paper dataset 'MNIST'"):
        open_dataset({"source": "paper", "path": str(tmp_path), "name": "MNIST"})
    with pytest.raises(DataError, match="source 'paper' needs name"):
        open_dataset({"source": "paper", "path": str(tmp_path)})
    root = make_prepared(tmp_path, "COVID")
    (root / "covid" / "classnames.txt").write_text("covid covid-19\nnormal normal\n")
    with pytest.raises(DataError, match="disagrees with the paper's class names"):
        open_dataset({"source": "paper", "path": str(root), "name": "COVID"})
    (root / "covid" / "classnames.txt").write_text("covid covid\nnormal normal\n")
    assert len(open_dataset({"source": "paper", "path": str(root), "name": "COVID"})) == 8
    for split in ("train", "test"):
        make_tree(root / "covid" / "images", {"pneumonia": 1}, split=split)
    with pytest.raises(DataError, match=r"needs exactly \['covid', 'normal'\].*unexpected \['pneumonia'\]"):
        open_dataset({"source": "paper", "path": str(root), "name": "COVID"})


def files(root, split, folder):
    return sorted(p.name for p in (root / "images" / split / folder).iterdir())


def test_prepare_covid_matches_the_official_script(tmp_path):
    raw = tmp_path / "raw" / "COVID-19_Radiography_Dataset"
    numbers = {"COVID": [1, 2, 3, 10, 11, 20, 100], "Normal": [1, 2, 9, 10, 12, 30]}
    for cls, nums in numbers.items():
        for n in reversed(nums):
            save(raw / cls / "images" / f"{cls}-{n}.png", noise(f"{cls}{n}", channels=1))
        save(raw / cls / "masks" / f"{cls}-1.png", noise("mask", channels=1))  # not used
    save(raw / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", noise("lo"))  # other classes: ignored

    report = prepare("COVID", tmp_path / "raw", tmp_path / "out")
    out = tmp_path / "out" / "covid"
    random.seed(0)  # the official train_test_split_covid.py, step by step
    for cls, folder in (("COVID", "covid"), ("Normal", "normal")):
        names = [f"{cls}-{n}.png" for n in sorted(numbers[cls])]
        train = random.sample(names, len(names) // 2)
        assert files(out, "train", folder) == sorted(train)
        assert files(out, "test", folder) == sorted(set(names) - set(train))
    assert report.counts == {"train": {"covid": 3, "normal": 3}, "test": {"covid": 4, "normal": 3}}
    assert report.duplicate_content == 0 and report.shared_groups is None
    assert (out / "classnames.txt").read_text() == "covid covid\nnormal normal\n"
    assert (out / "prepare.json").is_file()
    first = files(out, "train", "covid")[0]
    copied = (out / "images" / "train" / "covid" / first).read_bytes()
    assert copied == (raw / "COVID" / "images" / first).read_bytes()
    ds = open_dataset({"source": "paper", "path": str(tmp_path / "out"), "name": "COVID"})
    assert ds.counts() == {"train": [3, 3], "test": [4, 3]}

    with pytest.raises(DataError, match="already exists; remove it or pass overwrite=True"):
        prepare("COVID", tmp_path / "raw", tmp_path / "out")
    prepare("COVID", tmp_path / "raw", tmp_path / "out", overwrite=True)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no staging left
    with pytest.raises(DataError, match=r"recipe must be one of \['paper'\]"):
        prepare("COVID", tmp_path / "raw", tmp_path / "o2", recipe="grouped")


def test_prepare_covid_rejects_unexpected_names(tmp_path):
    save(tmp_path / "COVID" / "images" / "COVID-1.png", noise("a"))
    save(tmp_path / "COVID" / "images" / "scan.png", noise("b"))
    save(tmp_path / "Normal" / "images" / "Normal-1.png", noise("c"))
    with pytest.raises(DataError, match=r"scan.png is not named <Class>-<number>.png"):
        prepare("COVID", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "covid").exists()


def test_prepare_kather_and_leakage_warning(tmp_path):
    raw = tmp_path / "raw"
    folders = PAPER_DATASETS["Kather"].class_folders
    for split_dir in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        for cls in folders:
            save(raw / split_dir / cls / f"{cls}-{split_dir}.tif", noise(cls + split_dir, size=(224, 224)))
    save(raw / "NCT-CRC-HE-100K" / "ADI" / "small.tif", noise("small", size=(100, 100)))
    shutil.copyfile(raw / "NCT-CRC-HE-100K" / "TUM" / "TUM-NCT-CRC-HE-100K.tif",
                    raw / "CRC-VAL-HE-7K" / "TUM" / "copied.tif")

    with pytest.warns(UserWarning, match=r"1 test image\(s\) have the same content as a train image"):
        report = prepare("Kather", raw, tmp_path / "out")
    out = tmp_path / "out" / "kather"
    assert report.duplicate_content == 1
    assert report.counts["train"]["ADI"] == 2 and report.counts["test"]["TUM"] == 2
    assert sum(report.counts["test"].values()) == 10
    assert (out / "images" / "train" / "LYM" / "LYM-NCT-CRC-HE-100K.tif").read_bytes() == \
        (raw / "NCT-CRC-HE-100K" / "LYM" / "LYM-NCT-CRC-HE-100K.tif").read_bytes()
    assert Image.open(out / "images" / "train" / "ADI" / "small.tif").size == (224, 224)
    ds = open_dataset({"source": "paper", "path": str(tmp_path / "out"), "name": "KatherColon"})
    assert ds.classnames[0] == "adipose tissue" and ds.duplicates()["cross_split"] == 1

    shutil.rmtree(raw / "CRC-VAL-HE-7K" / "MUS")
    with pytest.raises(DataError, match=r"CRC-VAL-HE-7K has class folders .*expected"):
        prepare("Kather", raw, tmp_path / "out2")


def write_rsna(raw, rows):
    raw.mkdir(parents=True)
    with open(raw / "stage_2_detailed_class_info.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patientId", "class"])
        writer.writerows(rows)
    for pid, _ in rows:
        write_dicom(raw / "stage_2_train_images" / f"{pid}.dcm", noise(pid, size=(16, 16), channels=1))


def test_prepare_rsna18_paper_and_grouped(tmp_path):
    from sklearn.model_selection import train_test_split

    classes = ["Lung Opacity", "No Lung Opacity / Not Normal", "Normal"]
    rows = [(f"p{i:02d}", classes[i % 3]) for i in range(60)]
    rows += [(pid, cls) for pid, cls in rows if cls == "Lung Opacity"]  # several boxes per patient
    write_rsna(tmp_path / "raw" / "unprocessed", rows)
    train_rows, test_rows = train_test_split(rows, test_size=0.2, random_state=42)
    both = {p for p, _ in train_rows} & {p for p, _ in test_rows}
    assert both  # the fixture must exercise the leak

    with pytest.warns(UserWarning, match="leakage"):
        report = prepare("RSNA18", tmp_path / "raw", tmp_path / "out")
    assert report.duplicate_content == len(both) and report.shared_groups == len(both)
    out = tmp_path / "out" / "rsna18"
    assert files(out, "test", "lung_opacity") == sorted({f"{p}.jpg" for p, c in test_rows if c == classes[0]})
    assert Image.open(out / "images" / "test" / "normal" / files(out, "test", "normal")[0]).format == "JPEG"

    report = prepare("RSNA18", tmp_path / "raw", tmp_path / "grouped", recipe="grouped")
    assert report.duplicate_content == 0 and report.shared_groups == 0
    assert sum(sum(c.values()) for c in report.counts.values()) == 60

    (tmp_path / "raw" / "unprocessed" / "stage_2_train_images" / "p03.dcm").unlink()
    with pytest.raises(DataError, match=r"missing from .*e\.g\. p03\.dcm"):
        prepare("RSNA18", tmp_path / "raw", tmp_path / "out3")


def write_fold(raw, k, kinds):
    """PanNuke fold k with one image per entry of ``kinds`` (small 32x32 images)."""
    n = len(kinds)
    images = np.stack([noise(f"{k}-{i}", size=(32, 32)) for i in range(n)]).astype(np.float64)
    masks = np.zeros((n, 32, 32, 6), np.float64)
    for i, kind in enumerate(kinds):
        if kind == "malignant":  # 12 neoplastic + 2 inflammatory nuclei
            masks[i, :12, 0, 0] = np.arange(1, 13)
            masks[i, 20:22, 5, 1] = [13, 14]
        elif kind == "benign":  # inflammatory only
            masks[i, :3, 0, 1] = [1, 2, 3]
        elif kind == "unclear":  # 5 neoplastic: neither class
            masks[i, :5, 0, 0] = np.arange(1, 6)
    types = np.array(["Breast", "Adrenal_gland"] * n)[:n]
    (raw / f"Fold {k}" / "images" / f"fold{k}").mkdir(parents=True)
    (raw / f"Fold {k}" / "masks" / f"fold{k}").mkdir(parents=True)
    np.save(raw / f"Fold {k}" / "images" / f"fold{k}" / "images.npy", images)
    np.save(raw / f"Fold {k}" / "images" / f"fold{k}" / "types.npy", types)
    np.save(raw / f"Fold {k}" / "masks" / f"fold{k}" / "masks.npy", masks)
    return images


def test_prepare_pannuke_from_folds_and_from_patch_dump(tmp_path):
    from sklearn.model_selection import train_test_split

    raw = tmp_path / "raw"
    kinds = {1: ["malignant", "benign", "empty", "benign"], 2: ["unclear", "malignant", "benign"],
             3: ["malignant", "benign", "malignant"]}
    arrays = {k: write_fold(raw, k, v) for k, v in kinds.items()}
    report = prepare("PanNuke", raw, tmp_path / "out")
    out = tmp_path / "out" / "pannuke"

    names, labels, pixels = [], [], {}
    for label in ("malignant", "benign"):
        n = 0
        for k, fold in kinds.items():
            for i, kind in enumerate(fold):
                if kind == label:
                    tissue = ["breast", "adrenal gland"][i % 2]
                    names.append(f"{tissue}_{label}_{n:04d}.png")
                    pixels[names[-1]] = arrays[k][i].astype(np.uint8)
                    labels.append(label)
                    n += 1
    train, test = train_test_split(names, test_size=0.7, stratify=labels, random_state=1)
    assert files(out, "train", "malignant") + files(out, "train", "benign") == \
        sorted(n for n in train if "malignant" in n) + sorted(n for n in train if "benign" in n)
    assert report.counts == {"train": {"benign": 1, "malignant": 1}, "test": {"benign": 3, "malignant": 3}}
    sample = out / "images" / "test" / "benign" / files(out, "test", "benign")[0]
    assert Image.open(sample).size == (224, 224)

    dump = tmp_path / "dump"
    for name, array in pixels.items():
        save(dump / name, array)
    prepare("PanNuke", dump, tmp_path / "out2")
    for split in ("train", "test"):
        for cls in ("benign", "malignant"):
            assert files(tmp_path / "out2" / "pannuke", split, cls) == files(out, split, cls)
    (dump / names[0]).unlink()
    with pytest.raises(DataError, match="not numbered 0..2 without gaps"):
        prepare("PanNuke", dump, tmp_path / "out3")


def test_prepare_digestpath_patch_dump_paper_and_grouped(tmp_path):
    step2 = "step_2_tumor2patch_ratio_threshold=0.50"
    dump = tmp_path / "raw" / "processed" / "cropsize=224_overlap=0.10" / step2 / "images"
    rows = [("negative", f"neg{i % 3}") for i in range(10)] + [("positive", f"pos{i % 2}") for i in range(6)]
    counters = {"negative": 0, "positive": 0}
    names = []
    for folder, slide in rows:
        name = f"{slide}_downsample=2_{counters[folder]:05d}.png"
        counters[folder] += 1
        save(dump / folder / name, noise(name, size=(224, 224)))
        names.append(name)

    with pytest.warns(UserWarning, match=r"slide\(s\) have images in both train and test"):
        report = prepare("DigestPath", tmp_path / "raw", tmp_path / "out")
    order = np.random.RandomState(1).permutation(len(rows))
    pandas = pytest.importorskip("pandas")  # the official split is pandas' df.sample(frac=1, random_state=1)
    assert list(pandas.DataFrame({"x": range(len(rows))}).sample(frac=1, random_state=1).index) == list(order)
    train = {names[i] for i in order[: int(len(rows) * 0.7)]}
    out = tmp_path / "out" / "digestpath"
    assert set(files(out, "train", "benign") + files(out, "train", "malignant")) == train
    assert report.shared_groups > 0 and report.duplicate_content == 0

    report = prepare("DigestPath", tmp_path / "raw", tmp_path / "grouped", recipe="grouped")
    assert report.shared_groups == 0
    assert sum(report.counts["train"].values()) + sum(report.counts["test"].values()) == 16

    shutil.rmtree(tmp_path / "raw")
    (tmp_path / "raw" / "tissue-train-neg").mkdir(parents=True)
    with pytest.raises(DataError, match="does not re-implement PLIP's patch extraction"):
        prepare("DigestPath", tmp_path / "raw", tmp_path / "out4")
