"""``calibprompt datasets`` and ``calibprompt data {prepare,inspect}`` through ``cli.main``."""

from __future__ import annotations

import json

from calibprompt.cli import main
from tests.conftest import require_shared
from tests.test_data_helpers import make_tree, noise, save


def test_datasets_lists_the_paper_datasets(capsys):
    assert main(["datasets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["COVID", "RSNA18", "Kather", "PanNuke", "DigestPath"]
    kather = rows[2]
    assert kather["classes"][1] == "background" and kather["class_folders"][1] == "BACK"
    assert kather["template"] == "An H&E image of {}." and "H&E" in kather["modality"]
    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    assert "no_lung_opacity_not_normal" in text and "A chest X-ray image of {} patient" in text


def test_inspect_folder_with_skips_and_duplicates(tmp_path, capsys):
    make_tree(tmp_path / "d", {"benign": 3, "malignant": 2})
    (tmp_path / "d" / "benign" / "img0.png").replace(tmp_path / "d" / "benign" / "x.png")
    copied = (tmp_path / "d" / "benign" / "x.png").read_bytes()
    (tmp_path / "d" / "malignant" / "img0.png").write_bytes(copied)
    (tmp_path / "d" / "malignant" / "broken.png").write_bytes(b"oops")
    (tmp_path / "d" / "benign" / "readme.txt").write_text("notes")
    assert main(["data", "inspect", str(tmp_path / "d")]) == 2
    assert "malignant/broken.png" in capsys.readouterr().err

    assert main(["data", "inspect", str(tmp_path / "d"), "--skip-bad", "--test-fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "skipped (unreadable): 1" in out and "malignant/broken.png" in out
    assert "ignored (not images / outside class folders): 1" in out and "benign/readme.txt" in out
    assert "duplicate content: 1 image(s) repeat an earlier image" in out
    assert "test = 0.5 of each class" in out

    assert main(["data", "inspect", str(tmp_path / "d"), "--skip-bad", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"all": {"benign": 3, "malignant": 2}}
    assert report["duplicates"] == {"within": 1, "cross_split": 0} and len(report["skipped"]) == 1


def test_inspect_config_file_and_npz(tmp_path, capsys):
    npz = require_shared("medmnist/breastmnist.npz")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  source: medmnist\n  path: {npz}\n  template: 'An ultrasound of {{}}.'\n")
    assert main(["data", "inspect", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["test"] == {"malignant": 42, "normal, benign": 114}
    assert report["template"] == "An ultrasound of {}."
    assert main(["data", "inspect", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "0 malignant" in out and "test" in out and "156" in out
    config.write_text("data:\n  source: folder\n  path: x\n  shots: 8\n")
    assert main(["data", "inspect", str(config)]) == 2
    assert "unknown key 'shots'" in capsys.readouterr().err


def test_prepare_command(tmp_path, capsys):
    for cls in ("COVID", "Normal"):
        for n in range(1, 5):
            save(tmp_path / "raw" / cls / "images" / f"{cls}-{n}.png", noise(f"{cls}{n}", channels=1))
    args = ["--source", str(tmp_path / "raw"), "--out", str(tmp_path / "root")]
    assert main(["data", "prepare", "covid", *args]) == 0
    out = capsys.readouterr().out
    assert "COVID: wrote" in out and "train: 4 images (covid 2, normal 2)" in out
    assert (tmp_path / "root" / "covid" / "classnames.txt").is_file()
    assert main(["data", "prepare", "COVID", *args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "root" / "covid")]) == 0
    assert "A chest X-ray image of {} patient" in capsys.readouterr().out
