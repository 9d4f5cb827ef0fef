"""Tuning on validation shots only: the validation trainer matches `run`, the test split is never
touched, and a short Optuna study improves its objective; its output feeds a grid."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from calibprompt.config import load_config
from calibprompt.experiments import Grid
from calibprompt.engine.validation import FitView, TestSplitAccess, fit_view, validation_metrics
from tests.conftest import require_shared
from tests.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    npz = require_shared("medmnist/breastmnist.npz")
    root = tmp_path_factory.mktemp("tune")
    model = tiny_model_dir(root / "model", "clip")
    spec = {
        "name": "tune",
        "base": {"train": {"epochs": 2, "batch_size": 4}, "val_shots": 2, "cache_dir": str(root / "cache")},
        "backbones": {"tiny": {"path": str(model)}},
        "datasets": {"breast": {"source": "medmnist", "path": str(npz)}},
        "methods": ["coop-ce", "calibprompt"],
        "shots": 2,
        "seeds": [1],
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return {"root": root, "grid": path, "model": model, "npz": npz}


def _cfg(setup, **extra):
    base = {"backbone": {"path": str(setup["model"])}, "data": {"source": "medmnist", "path": str(setup["npz"])},
            "method": {"name": "calibprompt", "alpha": 0.2}, "shots": 2, "val_shots": 2,
            "train": {"epochs": 2, "batch_size": 4}, "cache_dir": str(setup["root"] / "cache")}
    base.update(extra)
    return load_config(None, base=base)


def test_validation_trainer_learns_exactly_what_run_learns(setup, tmp_path):
    from calibprompt.engine.run import run

    cfg = _cfg(setup)
    scored = validation_metrics(cfg, return_head=True)
    result = run(cfg, tmp_path / "run", quiet=True)
    assert scored["config_hash"] == result["config_hash"]
    assert torch.equal(scored["head"].weight, load_file(str(tmp_path / "run" / "head.safetensors"))["weight"])
    assert scored["n_val"] == 4 and scored["n_train"] == 4 and result["n_val"] == 4
    assert set(scored["metrics"]) >= {"accuracy", "ece", "nll", "brier"}


def test_fit_view_refuses_test_images(setup):
    from calibprompt.config import resolve

    view = fit_view(resolve(_cfg(setup)))
    assert isinstance(view, FitView) and len(view.train) == 4 and len(view.val) == 4
    assert all(s.split == "train" for s in view.train) and all(s.split == "val" for s in view.val)
    view.load(view.val[0])
    for ref in ("test/0", "test/17"):
        with pytest.raises(TestSplitAccess):
            view.load(ref)
        with pytest.raises(TestSplitAccess):
            view.content_hash(ref)
    with pytest.raises(ValueError, match="val_shots"):
        validation_metrics(_cfg(setup, val_shots=0))
    with pytest.raises(ValueError, match="post-hoc"):
        validation_metrics(_cfg(setup, method={"name": "coop-ce+ts"}))


def test_short_study_improves_validation_objective_without_touching_test(setup, tmp_path, monkeypatch, capsys):
    import calibprompt.engine.run
    from calibprompt.cli import main
    from calibprompt.data.base import ImageDataset

    loaded: list[str] = []
    original = ImageDataset.load

    def spy(self, sample):
        loaded.append(getattr(sample, "ref", sample))
        return original(self, sample)

    def no_run(*args, **kwargs):
        raise AssertionError("tuning must not call run(), which evaluates on the test split")

    monkeypatch.setattr(ImageDataset, "load", spy)
    monkeypatch.setattr(calibprompt.engine.run, "run", no_run)
    out = tmp_path / "tune"
    assert main(["tune", str(setup["grid"]), "--out", str(out), "--trials", "4", "--range", "alpha=0.05:0.3",
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0  # a fresh cache: every image is read
    printed = capsys.readouterr().out
    assert "tiny · breast" in printed and f"hparams: {out}/tuned.yaml" in printed
    assert loaded and all(not ref.startswith("test/") for ref in loaded)  # only train/ and val/ images

    tuned = yaml.safe_load((out / "tuned.yaml").read_text())
    cell, = tuned["cells"]
    assert tuned["method"] == "calibprompt" and tuned["objective"] == "val_nll" and cell["trials"] == 4
    assert cell["value"] < cell["first_value"]  # better than the preset defaults (trial 0)
    assert set(cell["set"]) == {"method.alpha", "method.lambda_as"}
    assert 0.05 <= cell["set"]["method.alpha"] <= 0.3
    assert cell["val_metrics"]["nll"] == pytest.approx(cell["value"])
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4 and rows[1].split(",")[3] == "COMPLETE"
    print(f"\nvalidation NLL: defaults {cell['first_value']:.4f} -> tuned {cell['value']:.4f}")

    # resumable: asking for more trials continues the same study
    assert main(["tune", str(setup["grid"]), "--out", str(out), "--trials", "5", "--range", "alpha=0.05:0.3",
                 "--quiet"]) == 0
    assert yaml.safe_load((out / "tuned.yaml").read_text())["cells"][0]["trials"] == 5
    params = [tuple(r.split(",")[4:6]) for r in (out / "trials.csv").read_text().strip().splitlines()[1:]]
    assert len(set(params)) == 5  # the resumed study drew a new point

    # the chosen values feed a grid
    grid = Grid.load(setup["grid"]).override()
    grid.hparams = str(out / "tuned.yaml")
    specs = grid.expand()
    chosen = yaml.safe_load((out / "tuned.yaml").read_text())["cells"][0]["set"]
    for s in specs:
        method = s.config["method"]
        if s.method == "calibprompt":
            assert method["alpha"] == chosen["method.alpha"] and method["lambda_as"] == chosen["method.lambda_as"]
        else:
            assert "alpha" not in method


def test_accuracy_floor_objective():
    from calibprompt.experiments.tune import objective_value

    ok = [{"ece": 0.05, "accuracy": 0.80, "nll": 0.4, "brier": 0.3}]
    low = [{"ece": 0.01, "accuracy": 0.70, "nll": 0.4, "brier": 0.3}]
    assert objective_value("val_ece_floor", ok, reference=0.80, acc_floor=0.01) == pytest.approx(0.05)
    assert objective_value("val_ece_floor", low, reference=0.80, acc_floor=0.01) == pytest.approx(0.01 + 1 + 0.09)
    assert objective_value("val_nll", ok + low) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="objective"):
        objective_value("test_ece", ok)
