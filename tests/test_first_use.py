"""What a new user hit on their own dataset (silent problems first): wordless class names, training that
did not learn, the same images giving other shots in another file format, pooled diagrams, a stuck
temperature, the transform API, file modes, a report sent as one file, discoverability, tuning noise."""

from __future__ import annotations

import csv
import io
import logging
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.data import make_split, open_dataset
from calibprompt.engine.checks import run_flags
from tests.conftest import require_shared


def _export(npz_path, root, n_per_split=30):
    """The first images of an npz written as a PNG folder and as a CSV manifest (same pictures)."""
    with np.load(npz_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    rows = []
    for split in ("train", "val", "test"):
        for i in range(n_per_split):
            label = int(arrays[f"{split}_labels"][i][0])
            rel = f"{split}/{label}/{i:04d}.png"
            (root / "folder" / split / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arrays[f"{split}_images"][i]).save(root / "folder" / rel)
            rows.append((f"folder/{rel}", label, split))
        arrays[f"{split}_images"] = arrays[f"{split}_images"][:n_per_split]
        arrays[f"{split}_labels"] = arrays[f"{split}_labels"][:n_per_split]
    np.savez(root / "small.npz", **arrays)
    with open(root / "small.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return root


def test_same_images_give_the_same_shots_in_every_format(tmp_path):
    npz = require_shared("medmnist/pneumoniamnist.npz")
    root = _export(npz, tmp_path)
    names = ["normal", "pneumonia"]
    sources = {
        "npz": {"source": "medmnist", "path": str(root / "small.npz"), "name": "pneumoniamnist"},
        "folder": {"source": "folder", "path": str(root / "folder"), "classnames": {"0": "normal", "1": "pneumonia"}},
        "csv": {"source": "csv", "path": str(root / "small.csv"), "classnames": {"0": "normal", "1": "pneumonia"}},
    }
    picks = {}
    for kind, cfg in sources.items():
        ds = open_dataset(cfg)
        assert ds.classnames == names, kind
        split = make_split(ds, shots=4, seed=3, val_shots=2)
        picks[kind] = sorted(ds.pixel_hash(s) for s in split.samples_for("train") + split.samples_for("val"))
    assert picks["npz"] == picks["folder"] == picks["csv"]
    by_bytes = {kind: sorted(open_dataset(cfg).content_hash(s)
                             for s in make_split(open_dataset(cfg), 4, 3, 2, by="bytes").samples_for("train"))
                for kind, cfg in sources.items()}
    assert by_bytes["npz"] != by_bytes["folder"]  # the old rule: file bytes differ from array bytes


def test_wordless_class_names_get_a_note_and_inspect_flags_them(tmp_path, caplog, capsys):
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i + 100 * int(label), np.uint8)).save(tmp_path / label / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        open_dataset({"source": "folder", "path": str(tmp_path)})
    assert any("without words ['0', '1']" in r.getMessage() and "data.classnames" in r.getMessage()
               for r in caplog.records)
    from calibprompt.cli import main

    assert main(["data", "inspect", str(tmp_path)]) == 0
    assert "class names without words" in capsys.readouterr().out


def test_runs_that_did_not_learn_or_sit_at_the_majority_rate_are_flagged():
    labels = np.array([0] * 7 + [1] * 3)
    flat = run_flags({"epoch_losses": [0.6931, 0.6930, 0.6929]}, None, {"accuracy": 0.7}, labels, True)
    assert [f["code"] for f in flat] == ["did_not_learn", "at_majority_rate"]
    assert "first epoch 0.6931, last 0.6929" in flat[0]["message"] and "70.0%" in flat[1]["message"]
    fine = run_flags({"epoch_losses": [0.69, 0.20]}, None, {"accuracy": 0.9}, labels, True)
    assert fine == []
    assert run_flags({"epoch_losses": [0.69, 0.69]}, None, {"accuracy": 0.9}, labels, False) == []


def test_flagged_cells_are_marked_and_never_ranked_best():
    from calibprompt.reporting.collect import Collection, Group
    from calibprompt.reporting.tables import build_tables, markdown

    def group(method, ece, flags=()):
        return Group(8, "b", "d", method, "", planned=1, seeds=[1], values={"ece": [ece], "accuracy": [0.8]},
                     flags=list(flags))

    collection = Collection({"name": "s"}, [group("stuck", 0.01, ["seed 1: the training loss did not decrease"]),
                                            group("ok", 0.05), group("other", 0.08)],
                            [], {"planned": 3, "done": 3, "failed": 0}, "standard")
    (table,) = build_tables(collection, ("ece",))
    assert table.ranks[("ok", "d", "ece")] == 1 and ("stuck", "d", "ece") not in table.ranks
    text = markdown([table], collection)
    assert "1.00 ‡" in text and "**5.00**" in text and "## ‡ Flagged runs" in text and "did not decrease" in text


def test_temperature_at_its_bound_names_the_value_and_the_cause():
    from calibprompt.calibration import get_calibrator

    logits = np.array([[0.01, -0.01], [-0.01, 0.01]] * 8)
    labels = np.array([0, 1] * 8)  # all correct: NLL keeps falling as T shrinks
    ts = get_calibrator("ts").fit(logits, labels)
    params = ts.fitted_params()
    assert params["temperature"] == pytest.approx(1e-3, rel=1e-2)
    assert "at the search bound" in params["at_bound"] and "100% accuracy, so NLL keeps falling" in params["at_bound"]
    wrong = get_calibrator("ts").fit(logits, 1 - labels).fitted_params()
    assert wrong["temperature"] == pytest.approx(1e3, rel=1e-2) and "0% accuracy" in wrong["at_bound"]
    flags = run_flags({}, {"name": "ts", "params": params}, {"accuracy": 0.9}, np.array([0, 1]), True)
    assert flags[0]["code"] == "temperature_at_bound" and "0.001" in flags[0]["message"]


def test_image_transform_returns_the_transform_and_says_so(tmp_path):
    from tests.tiny_models import tiny_model_dir

    from calibprompt.backbones import load_backbone

    backbone = load_backbone({"path": str(tiny_model_dir(tmp_path, "clip"))})
    image = Image.new("RGB", (40, 40))
    pixels = torch.stack([backbone.image_transform(train=False)(image)])
    assert backbone.encode_image(pixels).shape == (1, 32)
    with pytest.raises(TypeError, match=r"image_transform\(train=False\)\(image\)"):
        backbone.image_transform(image)


def test_outputs_follow_the_umask(tmp_path):
    from calibprompt.settings import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644


def test_predictions_name_their_classes_and_models_list_the_micro_model(capsys):
    from calibprompt.cli import main
    from calibprompt.data import Sample
    from calibprompt.engine.artifacts import predictions_csv

    text = predictions_csv([Sample("a.png", 0, "test")], torch.tensor([[1.0, 0.0]]), ["normal", "pneumonia"])
    assert next(csv.reader(io.StringIO(text))) == ["ref", "label", "prediction", "prob_normal", "prob_pneumonia"]
    assert main(["models"]) == 0
    assert "micro-medmnist" in capsys.readouterr().out


def test_tuning_says_when_the_winner_is_within_the_noise():
    from types import SimpleNamespace

    from calibprompt.experiments.tune_summary import separation

    def trial(value, seeds):
        return SimpleNamespace(value=value, user_attrs={"seed_values": seeds})

    first = trial(1.6125, [1.70, 1.52, 1.61])
    best = trial(1.6101, [1.72, 1.50, 1.61])
    noisy = separation(best, first, [first, best])
    assert not noisy["distinguishable"] and "not distinguishable" in noisy["reading"]
    clear = separation(trial(0.90, [0.91, 0.89, 0.90]), first, [first, trial(0.90, [0.91, 0.89, 0.90])])
    assert clear["distinguishable"] and clear["gain"] == pytest.approx(0.7125)


def test_pixel_identical_files_are_one_image_for_the_split(tmp_path):
    from calibprompt.data import holdout_test

    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
            Image.fromarray(pixels).save(tmp_path / label / f"{i}_copy.png", optimize=True, compress_level=1)
    ds = open_dataset({"source": "folder", "path": str(tmp_path), "test_fraction": 0.34})
    assert ds.content_hash("a/0.png") != ds.content_hash("a/0_copy.png")  # other bytes, same picture
    pool, test = holdout_test(ds, 0.34)
    test_pixels = {ds.pixel_hash(s) for s in test}
    assert not any(ds.pixel_hash(s) in test_pixels for s in pool)  # a picture never straddles the split
    split = make_split(ds, shots=3, seed=2, val_shots=1, test_fraction=0.34)
    picked = [ds.pixel_hash(r) for r in split.train + split.val]
    assert len(picked) == len(set(picked)) == 8 and split.overlap == 0


def test_saved_heads_refuse_another_class_list(tmp_path):
    from calibprompt.cli import main
    from tests.reliability.conftest import write_config
    from tests.tiny_models import tiny_model_dir, write_image_folder

    model = tiny_model_dir(tmp_path / "m", "clip")
    images = write_image_folder(tmp_path / "img", n_train=4, n_test=2)
    other = write_image_folder(tmp_path / "other", classes=("benign", "malignant"), n_train=4, n_test=2)
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", model, images)), "--out", str(out), "--quiet"]) == 0
    cfg = write_config(tmp_path / "o.yaml", model, other)
    assert main(["eval", str(cfg), "--head", str(out / "head.safetensors"), "--out", str(tmp_path / "e")]) == 2
    assert main(["eval", str(cfg), "--prompt", str(out / "prompt.safetensors"), "--out", str(tmp_path / "p")]) == 2


def test_tuning_refuses_methods_that_select_on_the_validation_shots():
    from calibprompt.config import load_config, resolve
    from calibprompt.engine.validation import check_tunable

    cfg = load_config(None, ["val_shots=2"], base={"backbone": {"path": "/x"}, "data": {"source": "folder", "path": "/x"},
                                                    "method": {"name": "linear-probe"}})
    with pytest.raises(ValueError, match="method.C"):
        check_tunable(resolve(cfg))
