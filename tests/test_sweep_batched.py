"""Batched configurations in `calibprompt sweep` (issue 18): prompt-learning runs of one backbone, data and
prompt layout train together with one text-encoder pass per step, and end with the numbers of runs trained
alone (within 1e-4); `--no-batch` trains each alone; other methods, failures and crashes stay per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from calibprompt.cli import main
from calibprompt.experiments import Grid, run_sweep
from calibprompt.experiments.sweep import plan_units
from tests.conftest import require_shared
from tests.tiny_models import tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    npz = require_shared("medmnist/breastmnist.npz")
    root = tmp_path_factory.mktemp("batched")
    spec = {
        "name": "batched",
        "base": {"train": {"epochs": 3, "batch_size": 4}, "val_shots": 4, "eval": {"bootstrap": 0}},
        "backbones": {"tiny": {"path": str(tiny_model_dir(root / "model", "clip"))}},
        "datasets": {"breast": {"source": "medmnist", "path": str(npz)}},
        "methods": ["coop-ce", "calibprompt", "linear-probe"],
        "shots": 4,
        "seeds": [1, 2],
    }
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    return {"root": root, "grid": grid}


def _sweep(setup, name: str, *flags: str) -> dict[str, dict]:
    out = setup["root"] / name
    assert main(["sweep", str(setup["grid"]), "--out", str(out), "-q", "--cache-dir", str(setup["root"] / "cache"),
                 *flags]) == 0
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/metrics.json"))}


@pytest.fixture(scope="module")
def both(setup):
    return _sweep(setup, "together"), _sweep(setup, "alone", "--no-batch")


def test_prompt_runs_train_together_and_match_runs_trained_alone(both):
    together, alone = both
    assert together.keys() == alone.keys() and len(together) == 6
    batched = {k for k, r in together.items() if r["train"].get("batched")}
    assert {together[k]["method"] for k in batched} == {"coop-ce", "calibprompt"}
    assert all(together[k]["train"]["batched"] == 4 for k in batched)  # 2 methods x 2 seeds in one pass
    assert not any(r["train"].get("batched") for r in alone.values())
    worst = 0.0
    for key, run in together.items():
        ours, theirs = run["metrics"], alone[key]["metrics"]
        for name, value in ours.items():
            if isinstance(value, float) and value == value:
                worst = max(worst, abs(value - theirs[name]))
        if key in batched:
            assert run["train"]["epoch_losses"] == pytest.approx(alone[key]["train"]["epoch_losses"], rel=1e-5)
    assert worst <= 1e-4


def test_saved_prompts_of_batched_runs_are_the_ones_their_metrics_come_from(setup, both):
    together, _ = both
    key = next(k for k, r in together.items() if r["train"].get("batched"))
    run_dir = setup["root"] / "together" / "runs" / key
    out = setup["root"] / "eval-again"
    assert main(["eval", str(run_dir / "config.yaml"), "--prompt", str(run_dir / "prompt.safetensors"),
                 "--out", str(out), "-q"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["metrics"]["ece"] == pytest.approx(together[key]["metrics"]["ece"], abs=1e-6)


def test_units_group_prompt_methods_only_and_respect_the_cap(setup):
    specs = Grid.load(setup["grid"]).expand()
    keys = {s.method: s.batch_group for s in specs}
    assert keys["linear-probe"] is None and keys["coop-ce"] == keys["calibprompt"] is not None
    todo = [(s, Path("x") / s.run_id) for s in specs]
    units = plan_units(todo, batch=3)
    assert sorted(len(u) for u in units) == [1, 1, 2, 2]  # 4 prompt runs in near-equal units of at most 3
    assert [len(u) for u in plan_units(todo, batch=1)] == [1] * 6


class _Crash(BaseException):
    """Stands for a killed process (not an Exception: nothing may catch it)."""


def test_a_crash_inside_joint_training_leaves_nothing_done_and_resumes(setup, both, monkeypatch):
    import calibprompt.methods.coop as coop

    grid = Grid.load(setup["grid"])
    out = setup["root"] / "crash"

    def crashing(*_args, **_kwargs):
        raise _Crash()

    monkeypatch.setattr(coop, "train_prompts_batched", crashing)
    with pytest.raises(_Crash):
        run_sweep(grid, out, cache_dir=str(setup["root"] / "cache"), log=None)
    monkeypatch.undo()
    assert not list((out / "runs").glob("*/metrics.json"))  # the unit was first: no run is taken as done
    summary = run_sweep(grid, out, cache_dir=str(setup["root"] / "cache"), log=None)
    assert (summary.executed, summary.done, summary.failed) == (6, 6, 0)
    together, _ = both
    for key, run in together.items():
        assert json.loads((out / "runs" / key / "metrics.json").read_text())["metrics"]["ece"] == \
            pytest.approx(run["metrics"]["ece"], abs=1e-9)  # the same unit again: the same numbers


def test_a_failing_joint_training_falls_back_to_runs_alone(setup, both, monkeypatch, caplog):
    import logging

    import calibprompt.methods.coop as coop

    def failing(*_args, **_kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(coop, "train_prompts_batched", failing)
    out = setup["root"] / "fallback"
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        summary = run_sweep(Grid.load(setup["grid"]), out, cache_dir=str(setup["root"] / "cache"), log=None)
    assert (summary.done, summary.failed) == (6, 0)
    assert any("fitting them one by one" in r.getMessage() for r in caplog.records)
    _, alone = both
    for key, run in alone.items():
        assert json.loads((out / "runs" / key / "metrics.json").read_text())["metrics"] == run["metrics"]


def test_run_many_reports_a_bad_config_without_stopping_the_others(setup, tmp_path):
    from calibprompt.engine.run import run_many

    spec = Grid.load(setup["grid"]).expand()[0]
    bad = {**spec.config, "data": {"source": "medmnist", "path": str(tmp_path / "missing.npz")}}
    results = run_many([bad, spec.config], [tmp_path / "a", tmp_path / "b"])
    assert isinstance(results[0], Exception) and "missing.npz" in str(results[0])
    assert results[1]["status"] == "done"
    assert torch.is_tensor(torch.tensor(results[1]["metrics"]["ece"]))
