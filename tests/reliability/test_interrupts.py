"""Faults 1-2 (docs/reliability.md): a sweep killed with SIGKILL and run again; two sweeps and two
runs aimed at one folder at once; the store after sweep.json is deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from calibprompt.experiments import ResultStore
from tests.reliability.conftest import REPO, cli, write_config


def _grid(tmp_path, model, images, epochs=40):
    spec = {"name": "faults", "base": {"train": {"epochs": epochs, "batch_size": 2}},
            "backbones": {"tiny": {"path": str(model)}},
            "datasets": {"img": {"source": "folder", "path": str(images)}},
            "methods": ["coop-ce", "calibprompt"], "shots": 2, "seeds": [1, 2]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(out):
    store = ResultStore.for_dir(out)
    sweep = json.loads((out / "sweep.json").read_text())["sweep_id"]
    rows = store.rows(sweep)
    store.close()
    return rows


def test_sweep_killed_mid_run_resumes_with_one_row_per_run(tmp_path, model, images):
    grid, out = _grid(tmp_path, model, images), tmp_path / "sweep"
    # --no-batch: runs one after another, so a kill can land between two of them (runs trained together
    # finish within milliseconds of each other; their crash case is in tests/test_sweep_batched.py)
    proc = subprocess.Popen([sys.executable, "-m", "calibprompt", "sweep", str(grid), "--out", str(out), "--quiet",
                             "--no-batch"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("runs/*/metrics.json")):
        time.sleep(0.2)
    time.sleep(0.5)  # into the next run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name for p in out.glob("runs/*/metrics.json")}
    assert 1 <= len(finished_before) < 4, "the kill must land after the first run and before the last"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}
    again = cli("sweep", str(grid), "--out", str(out), "--quiet", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["done"] == 4 and summary["failed"] == 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    for name, mtime in mtimes.items():  # finished runs were skipped, not redone
        assert (out / "runs" / name / "metrics.json").stat().st_mtime_ns == mtime
    for folder in (out / "runs").iterdir():
        result = json.loads((folder / "metrics.json").read_text())
        assert result["status"] == "done" and 0 <= result["metrics"]["ece"] <= 1


def test_two_sweeps_on_one_folder_second_refuses_naming_the_holder(tmp_path, model, images):
    grid, out = _grid(tmp_path, model, images, epochs=30), tmp_path / "sweep"
    first = subprocess.Popen([sys.executable, "-m", "calibprompt", "sweep", str(grid), "--out", str(out), "--quiet"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".sweep.lock.pid").is_file():
        time.sleep(0.1)
    second = cli("sweep", str(grid), "--out", str(out), "--quiet")
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
    assert "database is locked" not in second.stderr
    assert first.wait(timeout=300) == 0
    rows = _rows(out)
    assert len(rows) == 4 and len({r["config_hash"] for r in rows}) == 4


def test_two_trains_into_one_out_second_refuses(tmp_path, model, images):
    cfg = write_config(tmp_path / "run.yaml", model, images, train={"epochs": 60, "batch_size": 2})
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "calibprompt", "train", str(cfg), "--out", str(out), "--quiet"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / ".run.lock.pid").is_file():
        time.sleep(0.1)
    second = cli("train", str(cfg), "--out", str(out), "--quiet", "--set", "seed=2")
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr
    assert first.wait(timeout=300) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["seed"] == 1  # the folder holds the first run, whole: config, split and metrics agree
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 1


def test_store_keeps_one_row_per_run_after_sweep_json_is_deleted(tmp_path, model, images):
    grid, out = _grid(tmp_path, model, images, epochs=2), tmp_path / "sweep"
    assert cli("sweep", str(grid), "--out", str(out), "--quiet").returncode == 0
    sweep_id = json.loads((out / "sweep.json").read_text())["sweep_id"]
    os.remove(out / "sweep.json")
    assert cli("sweep", str(grid), "--out", str(out), "--quiet").returncode == 0
    assert json.loads((out / "sweep.json").read_text())["sweep_id"] == sweep_id
    store = ResultStore.for_dir(out)
    with store.engine.connect() as conn:
        from sqlalchemy import func, select

        from calibprompt.experiments.store import runs, sweeps

        assert conn.execute(select(func.count()).select_from(runs)).scalar() == 4
        assert conn.execute(select(func.count()).select_from(sweeps)).scalar() == 1
    store.close()
