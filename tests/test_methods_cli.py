"""Feature-space methods through the command line: ``train`` then ``eval --head`` in the same numbers,
a sweep over every method with its report, ``calibprompt methods`` listing them, the grid preset."""

from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import yaml

from calibprompt.cli import main
from calibprompt.experiments.grid import Grid, list_presets
from tests.conftest import require_shared
from tests.tiny_models import tiny_model_dir

FEATURE_METHODS = ["linear-probe", "linear-probe-smac", "zs-lp", "lp++", "clap", "tip-adapter", "tip-adapter-f",
                   "clip-adapter"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    npz = require_shared("medmnist/breastmnist.npz")
    root = tmp_path_factory.mktemp("methods-cli")
    model = tiny_model_dir(root / "model", "clip")
    cfg = {"backbone": {"path": str(model)}, "data": {"source": "medmnist", "path": str(npz)},
           "shots": 4, "val_shots": 2, "train": {"epochs": 2, "batch_size": 4}, "cache_dir": str(root / "cache")}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": path, "model": model, "npz": npz}


def _probs(folder) -> np.ndarray:
    with open(folder / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(v) for k, v in row.items() if k.startswith("prob_")] for row in rows])


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_train_then_eval_head_gives_the_same_probabilities(setup, method, tmp_path, capsys):
    out = tmp_path / "train"
    extra = [] if method in ("linear-probe", "linear-probe-smac", "tip-adapter") else ["--set", "method.epochs=3"]
    assert main(["train", str(setup["config"]), "--set", f"method.name={method}", *extra, "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "head.safetensors").is_file() and not (out / "prompt.safetensors").exists()
    result = json.loads((out / "metrics.json").read_text())
    assert result["method_kind"] == method.removesuffix("-smac")
    again = tmp_path / "eval"
    assert main(["eval", str(out / "config.yaml"), "--head", str(out / "head.safetensors"), "--out", str(again),
                 "--quiet"]) == 0
    assert np.abs(_probs(out) - _probs(again)).max() < 1e-6
    assert json.loads((again / "metrics.json").read_text())["images_encoded"] == 0  # all features cached


def test_coop_head_and_prompt_files_evaluate_alike(setup, tmp_path):
    out = tmp_path / "coop"
    assert main(["train", str(setup["config"]), "--set", "method.name=coop-ce", "--out", str(out), "--quiet"]) == 0
    by_head, by_prompt = tmp_path / "h", tmp_path / "p"
    assert main(["eval", str(out / "config.yaml"), "--head", str(out / "head.safetensors"), "--out", str(by_head),
                 "--quiet"]) == 0
    assert main(["eval", str(out / "config.yaml"), "--prompt", str(out / "prompt.safetensors"), "--out",
                 str(by_prompt), "--quiet"]) == 0
    assert np.abs(_probs(by_head) - _probs(out)).max() < 1e-6
    assert np.abs(_probs(by_prompt) - _probs(out)).max() < 1e-6


def test_linear_probe_without_validation_shots_fails_before_work(setup, tmp_path, capsys):
    code = main(["train", str(setup["config"]), "--set", "method.name=linear-probe", "--set", "val_shots=0",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "val_shots" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sweep_and_report_treat_feature_methods_like_any_other(setup, tmp_path):
    spec = {"name": "adapters", "base": yaml.safe_load(setup["config"].read_text()),
            "backbones": {"tiny": {"path": str(setup["model"])}},
            "datasets": {"breast": {"source": "medmnist", "path": str(setup["npz"])}},
            "methods": {"CoOp-CE": {"name": "coop-ce"},
                        **{m: {"name": m, **({"epochs": 3} if m not in ("linear-probe", "linear-probe-smac", "tip-adapter")
                                             else {})} for m in FEATURE_METHODS}},
            "shots": 4, "seeds": [1]}
    spec["base"].pop("backbone"), spec["base"].pop("data"), spec["base"].pop("shots")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["sweep", str(grid), "--out", str(out), "--quiet", "--json"]) == 0
    summary = json.loads(buf.getvalue())
    assert summary["done"] == 1 + len(FEATURE_METHODS) and summary["failed"] == 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", str(out), "--format", "csv"]) == 0
    table = buf.getvalue()
    for method in FEATURE_METHODS:
        assert method in table
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    assert "lp++" in page and "src='figures/" in page and "its ECE is the pooled one" in page
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(out), "--self-contained"]) == 0
    page = (out / "report" / "report.html").read_text()
    assert "src='figures/" not in page and page.count("data:image/png;base64,") >= 2


def test_methods_command_lists_every_method_with_its_formula(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for method in FEATURE_METHODS:
        assert method in text
    assert "z = W f̂ + b + α ⊙ (f̂ Tᵀ)" in text  # LP++'s formula
    assert "+ts" in text
    assert main(["methods", "--json"]) == 0
    records = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert records["clap"]["family"] == "feature" and records["calibprompt"]["family"] == "prompt"
    assert records["linear-probe"]["params"]["C"] is None


def test_baselines_adapters_grid_preset_expands(monkeypatch):
    assert "baselines-adapters" in list_presets()
    monkeypatch.setenv("CALIBPROMPT_MODELS", "/models")
    monkeypatch.setenv("CALIBPROMPT_PAPER_DATA", "/datasets")
    grid = Grid.load("baselines-adapters")
    specs = grid.expand()
    methods = {s.method for s in specs}
    assert {"linear-probe", "lp++", "clap", "tip-adapter", "tip-adapter-f", "clip-adapter", "calibprompt"} <= methods
    assert len(specs) == 10 * 11 * 3
