"""Taking a tuned model to new images: conformal coverage on the micro model's test split, export ->
predict in a fresh process equal to `calibprompt eval`, damaged or mismatched model files, the
scikit-learn-style classifier (README example, applicable estimator checks)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibprompt.cli import main
from calibprompt.config import load_config, merge
from calibprompt.deploy import CalibPromptClassifier, DeployedModel, ModelFileError, load_model, predict_files
from calibprompt.engine.run import run
from tests.conftest import require_shared
from tests.tiny_models import pretrain_tiny_micro

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro model pretrained for ~10 s on PneumoniaMNIST (about 83% zero-shot validation accuracy)."""
    return pretrain_tiny_micro(tmp_path_factory.mktemp("model") / "micro", steps=300)


def _cfg(micro, data: dict, **extra) -> dict:
    cfg = load_config(None)
    merge(cfg, {"backbone": {"path": str(micro)}, "data": data, **extra}, "test")
    return cfg


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_coverage_on_the_micro_test_split_over_five_seeds(micro, tmp_path, score):
    """Split conformal at alpha 0.1, calibrated on 100 validation images per class: coverage of the 624 test
    images within 0.9 +- 0.03, averaged over 5 seeds, for each score."""
    data = {"source": "medmnist", "name": "pneumoniamnist", "path": str(require_shared("medmnist/pneumoniamnist.npz"))}
    coverage, sizes = [], []
    for seed in range(1, 6):
        result = run(_cfg(micro, data, method={"name": "zeroshot"}, shots=1, val_shots=100, seed=seed,
                          conformal={"alpha": 0.1, "score": score}), tmp_path / f"s{seed}", quiet=True)
        coverage.append(result["metrics"]["cp_coverage"])
        sizes.append(result["metrics"]["cp_set_size"])
        assert result["conformal"]["n_calibration"] == 200 and result["n_test"] == 624
    assert abs(np.mean(coverage) - 0.9) <= 0.03, coverage
    assert 1.0 <= np.mean(sizes) <= 2.0


def _png_folder(root: Path, per_class: int = 30) -> Path:
    """PneumoniaMNIST images as PNG files in class folders (no split: the run holds out a test fraction)."""
    with np.load(require_shared("medmnist/pneumoniamnist.npz")) as data:
        images, labels = data["train_images"], data["train_labels"][:, 0]
    for k, name in enumerate(("normal", "pneumonia")):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:per_class]:
            Image.fromarray(images[i]).save(root / name / f"{i}.png")
    return root


def _probs(path: Path, key: str) -> dict[str, list[float]]:
    with open(path, newline="") as handle:
        return {Path(row[key]).name: [float(row[c]) for c in row if c.startswith("prob_")]
                for row in csv.DictReader(handle)}


def test_export_then_predict_in_a_fresh_process_equals_eval(micro, tmp_path):
    images = _png_folder(tmp_path / "xrays")
    data = {"source": "folder", "path": str(images), "test_fraction": 0.3}
    cfg = _cfg(micro, data, method={"name": "calibprompt", "alpha": 0.1, "lambda_as": 1.0}, shots=4, val_shots=8,
               posthoc="ts", train={"epochs": 3, "n_views": 2}, conformal={"alpha": 0.2, "score": "aps"},
               selective={"target_risk": 0.3})
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({k: cfg[k] for k in ("backbone", "data", "method", "shots", "val_shots", "posthoc",
                                                      "train", "conformal", "selective")}))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert main(["eval", str(config), "--head", str(tmp_path / "run" / "head.safetensors"),
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model.safetensors")]) == 0

    test_refs = [row["ref"] for row in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))]
    new = tmp_path / "new_images"  # the test images, copied where the model never saw them
    new.mkdir()
    for ref in test_refs:
        shutil.copy(images / ref, new / Path(ref).name)
    env = {**os.environ, "CALIBPROMPT_CACHE": str(tmp_path / "fresh-cache")}  # nothing reused: encoded again
    out = subprocess.run([sys.executable, "-m", "calibprompt", "predict", str(tmp_path / "model.safetensors"),
                          str(new), "--format", "csv", "--out", str(tmp_path / "pred.csv"), "--quiet"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    predicted = _probs(tmp_path / "pred.csv", "image")
    evaluated = _probs(tmp_path / "eval" / "predictions.csv", "ref")
    assert set(predicted) == set(evaluated) and len(predicted) == len(test_refs)
    assert max(abs(a - b) for n in predicted for a, b in zip(predicted[n], evaluated[n])) <= 1e-6

    model = load_model(tmp_path / "model.safetensors")
    assert model.calibrator.name == "ts" and model.conformal.alpha == 0.2 and model.selective.target_risk == 0.3
    eval_rows = {Path(r["ref"]).name: r for r in csv.DictReader(open(tmp_path / "eval" / "predictions.csv"))}
    pred_rows = {Path(r["image"]).name: r for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    names = model.classnames
    for name, row in pred_rows.items():  # the same sets and abstentions as the evaluation
        assert row["set"] == "|".join(names[int(k)] for k in eval_rows[name]["set"].split("|") if k)
        assert row["abstain"] == eval_rows[name]["abstain"]


def test_a_medmnist_run_predicts_the_same_on_its_images_saved_as_png(micro, tmp_path):
    """The demo's situation: a run on the MedMNIST arrays, exported, then `predict` on the same test pictures
    written as PNG files: the same probabilities (1e-6) and the same randomised APS sets."""
    npz = require_shared("medmnist/pneumoniamnist.npz")
    data = {"source": "medmnist", "name": "pneumoniamnist", "path": str(npz)}
    run(_cfg(micro, data, method={"name": "zeroshot"}, shots=1, val_shots=20, conformal={"alpha": 0.1}),
        tmp_path / "run", quiet=True)
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "m.safetensors")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))[:40]
    with np.load(npz) as arrays:
        test_images = arrays["test_images"]
    (tmp_path / "png").mkdir()
    for row in rows:  # refs are "test/<index>"
        Image.fromarray(test_images[int(row["ref"].split("/")[1])]).save(tmp_path / "png" / f"{row['ref'].split('/')[1]}.png")
    records = {Path(r["image"]).stem: r for r in predict_files(
        load_model(tmp_path / "m.safetensors"), [tmp_path / "png"])}
    names = records[rows[0]["ref"].split("/")[1]]["probabilities"].keys()
    for row in rows:
        got = records[row["ref"].split("/")[1]]
        assert max(abs(got["probabilities"][n] - float(row[f"prob_{n}"])) for n in names) <= 1e-6
        assert [list(names).index(n) for n in got["set"]] == [int(k) for k in row["set"].split("|") if k]


@pytest.fixture(scope="module")
def exported(micro, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    images = _png_folder(root / "xrays", per_class=12)
    cfg = _cfg(micro, {"source": "folder", "path": str(images), "test_fraction": 0.3},
               method={"name": "zeroshot"}, shots=1, val_shots=6, posthoc="ts", conformal={"alpha": 0.2, "score": "lac"})
    run(cfg, root / "run", quiet=True)
    assert main(["export", str(root / "run"), "--out", str(root / "model.safetensors")]) == 0
    return root / "model.safetensors", images


def _resave(model: DeployedModel, path: Path, edit=None) -> Path:
    """Re-write a model with edited metadata and a valid checksum (to reach the checks behind it)."""
    from safetensors import safe_open
    from safetensors.torch import save

    data = model.to_bytes()
    path.write_bytes(data)
    if edit is None:
        return path
    with safe_open(str(path), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    edit(meta)
    from calibprompt.deploy.model import _digest

    meta.pop("sha256", None)
    meta["sha256"] = _digest(tensors, meta)
    path.write_bytes(save(tensors, metadata=meta))
    return path


def test_damaged_or_mismatched_model_files_fail_clearly(exported, micro, tmp_path, capsys):
    path, images = exported
    model = load_model(path)
    raw = path.read_bytes()

    flipped = bytearray(raw)
    flipped[-5] ^= 0x01  # a byte of tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="changed after it was exported"):
        load_model(tmp_path / "flip.safetensors")
    header = bytearray(raw)
    header[12] ^= 0x20  # a byte of the JSON header
    (tmp_path / "header.safetensors").write_bytes(bytes(header))
    with pytest.raises(ModelFileError, match="header.safetensors"):
        load_model(tmp_path / "header.safetensors")

    missing = _resave(model, tmp_path / "missing.safetensors", lambda m: m.pop("conformal"))
    with pytest.raises(ModelFileError, match=r"missing \['conformal'\]"):
        load_model(missing)
    classes = _resave(model, tmp_path / "classes.safetensors",
                      lambda m: m.update(classnames=json.dumps(["a", "b", "c"])))
    with pytest.raises(ModelFileError, match="has 2 classes, this task has 3"):
        load_model(classes)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)  # a pickle is never opened
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(tmp_path / "pickle.safetensors")
    with pytest.raises(ModelFileError, match="not an exported calibprompt model"):
        load_model(path.parent / "run" / "head.safetensors")

    from tests.random_models import write_random_open_clip
    from tests.tiny_models import TINY_CLIP

    other = write_random_open_clip(tmp_path / "other-model", TINY_CLIP, seed=3)
    code = main(["predict", str(path), str(images / "normal"), "--backbone-path", str(other), "--quiet"])
    assert code == 2  # an input error: one line naming the fix
    assert "fitted on another backbone" in capsys.readouterr().err


def test_predict_reads_files_folders_and_csv_lists(exported, tmp_path, capsys):
    path, images = exported
    pngs = sorted((images / "normal").glob("*.png"))
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "\n".join(str(p) for p in pngs[:2]) + "\n")
    assert main(["predict", str(path), str(pngs[0]), str(images / "pneumonia"), str(listing), "--format", "json",
                 "--quiet"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 1 + 12 + 1  # pngs[0] appears once although listed twice
    for r in records:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-9 and r["prediction"] in r["probabilities"]
        assert set(r["set"]) <= set(r["probabilities"]) and r["abstain"] is None
    odd = tmp_path / "odd.csv"
    odd.write_text("filepath\n" + str(pngs[0]) + "\n")
    assert main(["predict", str(path), str(odd), "--quiet"]) == 2
    assert "path, image, file, filename" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["predict", str(path), str(broken), "--quiet"]) == 2
    assert "x.png" in capsys.readouterr().err


def _readme_python_block() -> str:
    text = README.read_text()
    section = text[text.index("### 4. Take the tuned model to new images"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_classifier_example_runs_as_written(micro, tmp_path, monkeypatch, capsys):
    code = _readme_python_block()
    assert len([line for line in code.splitlines() if line.strip()]) <= 11
    cache = tmp_path / "cache"
    shutil.copytree(micro, cache / "models" / "micro-medmnist")  # where backbone="micro-medmnist" looks
    monkeypatch.setenv("CALIBPROMPT_CACHE", str(cache))
    os.symlink(require_shared("medmnist/pneumoniamnist.npz").resolve(), tmp_path / "pneumoniamnist.npz")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    accuracy, size = map(float, re.search(r"accuracy ([\d.]+), mean set size ([\d.]+)", printed).groups())
    assert 0 <= accuracy <= 1 and 0 <= size <= 2

    again = CalibPromptClassifier.load(tmp_path / "pneumonia.safetensors")
    with np.load(tmp_path / "pneumoniamnist.npz") as data:
        images = data["test_images"][:50]
    assert again.model_.conformal.alpha == 0.1 and list(again.classes_) == [0, 1]
    assert again.predict_proba(images).shape == (50, 2) and set(again.predict(images)) <= {0, 1}
    assert again.predict_set(images).shape == (50, 2)


def test_classifier_fits_paths_and_other_alphas(micro, tmp_path):
    images = _png_folder(tmp_path / "xrays", per_class=14)
    paths = sorted(images.rglob("*.png"))
    labels = np.array(["normal" if p.parent.name == "normal" else "pneumonia" for p in paths])
    clf = CalibPromptClassifier(backbone=str(micro), method="zeroshot", val_shots=10, conformal_alpha=0.2,
                                conformal_score="lac", cache_dir=str(tmp_path / "cache"))
    assert clf.fit(paths, labels) is clf
    assert list(clf.classes_) == ["normal", "pneumonia"] and clf.model_.classnames == ["normal", "pneumonia"]
    proba = clf.predict_proba(paths[:6])
    assert proba.shape == (6, 2) and np.allclose(proba.sum(1), 1)
    assert set(clf.predict(paths[:6])) <= {"normal", "pneumonia"}
    loose, tight = clf.predict_set(paths, alpha=0.4).sum(), clf.predict_set(paths, alpha=0.1).sum()
    assert loose <= tight
    with pytest.raises(ValueError, match="has 14 image"):
        CalibPromptClassifier(backbone=str(micro), method="zeroshot", val_shots=10, shots=8).fit(paths, labels)
    with pytest.raises(ValueError, match="one label per image"):
        clf.fit(paths, labels[:-1])


def test_applicable_scikit_learn_estimator_checks():
    """The checks of sklearn.utils.estimator_checks that do not fit on random 2-D matrices (docs/deploy.md
    says why the others do not apply to an image classifier)."""
    from sklearn.base import clone
    from sklearn.utils import estimator_checks as checks

    estimator = CalibPromptClassifier(method="zeroshot", val_shots=3)
    name = type(estimator).__name__
    ran = []
    for check in ("check_no_attributes_set_in_init", "check_parameters_default_constructible",
                  "check_get_params_invariance", "check_set_params", "check_estimators_unfitted",
                  "check_estimator_repr", "check_estimator_cloneable", "check_do_not_raise_errors_in_init_or_set_params"):
        if hasattr(checks, check):
            getattr(checks, check)(name, estimator)
            ran.append(check)
    assert len(ran) >= 5, ran
    assert clone(estimator).get_params() == estimator.get_params()


def test_predict_reads_16_bit_tiff_and_dicom(exported, tmp_path, capsys):
    from tests.test_data_helpers import write_dicom

    path, _ = exported
    rng = np.random.default_rng(3)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 4096, (40, 40), dtype=np.uint16)).save(folder / "a.tif")
    write_dicom(folder / "b.dcm", rng.integers(0, 4096, (40, 40), dtype=np.uint16), bits_stored=12)
    assert main(["predict", str(path), str(folder), "--format", "json", "--quiet"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert sorted(Path(r["image"]).name for r in records) == ["a.tif", "b.dcm"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-9 for r in records)
