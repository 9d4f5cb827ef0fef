"""Sweeps end to end on a tiny randomly initialised model and real MedMNIST images: the local executor,
a local Ray instance (started once for this module, 2 CPUs) giving identical numbers, a failing run
isolated, resume after a simulated crash, and the report checked cell by cell against the store."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from calibprompt.cli import main
from calibprompt.experiments import Grid, ResultStore, run_sweep
from calibprompt.reporting.tables import METRIC_INFO
from calibprompt.experiments.sweep import read_sweep_file
from tests.conftest import require_shared
from tests.tiny_models import tiny_model_dir

TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    npz = require_shared("medmnist/breastmnist.npz")
    root = tmp_path_factory.mktemp("exp")
    model = tiny_model_dir(root / "model", "clip")
    spec = {
        "name": "e2e",
        "base": {"train": {"epochs": 2, "batch_size": 4}, "val_shots": 6, "conformal": {"alpha": 0.2, "score": "lac"}},
        "backbones": {"tiny": {"path": str(model)}},
        "datasets": {"breast": {"source": "medmnist", "path": str(npz)},
                     "broken": {"source": "medmnist", "path": str(root / "missing" / "breastmnist.npz")}},
        "methods": ["coop-ce", "calibprompt"],
        "shots": 2,
        "seeds": [1, 2],
    }
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    return {"root": root, "grid": grid, "spec": spec, "npz": npz}


@pytest.fixture(scope="module")
def local_sweep(setup):
    out = setup["root"] / "local"
    buf = io.StringIO()
    import contextlib

    start = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(["sweep", str(setup["grid"]), "--out", str(out), "--quiet", "--json",
                     "--cache-dir", str(setup["root"] / "cache-local")])
    TIMES["local"] = time.perf_counter() - start
    return {"out": out, "code": code, "summary": json.loads(buf.getvalue())}


def _rows(out: Path) -> dict[str, dict]:
    sweep = read_sweep_file(out)
    store = ResultStore.for_dir(out)
    try:
        return {r["config_hash"]: r for r in store.rows(sweep["sweep_id"])}
    finally:
        store.close()


def test_local_sweep_records_every_run_and_isolates_failures(local_sweep):
    out, summary = local_sweep["out"], local_sweep["summary"]
    assert local_sweep["code"] == 1  # some runs failed: the command says so, after finishing the grid
    assert (summary["planned"], summary["done"], summary["failed"], summary["executed"]) == (8, 4, 4, 8)
    rows = _rows(out)
    assert len(rows) == 8
    for row in rows.values():
        if row["dataset"] == "broken":
            assert row["status"] == "failed" and "does not exist" in row["error"] and row["metrics"] is None
            assert row["attempts"] == 1
            continue
        assert row["status"] == "done" and row["error"] is None
        result = json.loads((out / "runs" / row["run_id"] / "metrics.json").read_text())
        assert result["config_hash"] == row["config_hash"] and result["status"] == "done"
        assert row["metrics"] == result["metrics"] and row["config"] == result["config"]
        assert row["ece"] == result["metrics"]["ece"] and row["accuracy"] == result["metrics"]["accuracy"]
        assert set(row["timings"]) >= {"total", "train"} and row["versions"]["torch"]
        assert result["config"]["seed"] == row["seed"] and result["config"]["method"]["name"] == row["method"]
    sweep = read_sweep_file(out)
    assert [r["config_hash"] for r in sweep["runs"]] == [s.config_hash for s in Grid.load(out.parent / "grid.yaml").expand()]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", object_store_memory=200 * 1024**2)
    TIMES["ray_start"] = time.perf_counter() - start
    yield ray
    ray.shutdown()


def test_ray_executor_gives_identical_results(setup, local_sweep, ray_instance):
    out = setup["root"] / "ray"
    start = time.perf_counter()
    summary = run_sweep(Grid.load(setup["grid"]), out, executor="ray", log=None,
                        cache_dir=str(setup["root"] / "cache-ray"))  # its own cache: features recomputed
    TIMES["ray"] = time.perf_counter() - start
    assert (summary.done, summary.failed) == (4, 4)
    local, remote = _rows(local_sweep["out"]), _rows(out)
    assert set(local) == set(remote)
    for digest, row in local.items():
        other = remote[digest]
        assert other["status"] == row["status"]
        assert other["metrics"] == row["metrics"]  # bit-identical numbers
        assert other["metrics_reference"] == row["metrics_reference"]
        if row["status"] == "done":
            run_dir = out / "runs" / row["run_id"]
            for name in ("metrics.json", "predictions.csv", "prompt.safetensors", "reliability.png", "split.json"):
                assert (run_dir / name).is_file(), name
            assert (run_dir / "predictions.csv").read_text() == \
                (local_sweep["out"] / "runs" / row["run_id"] / "predictions.csv").read_text()
        else:
            assert "does not exist" in other["error"]
    # one encoding per image across Ray's workers too: they fill one cache folder under its encode lock
    encoded = {name: sum(json.loads(p.read_text())["images_encoded"] for p in (o / "runs").glob("*/metrics.json"))
               for name, o in (("local", local_sweep["out"]), ("ray", out))}
    assert encoded["ray"] == encoded["local"] > 0, encoded
    print(f"\nsweep wall time: local {TIMES['local']:.1f} s, ray {TIMES['ray']:.1f} s "
          f"(+ {TIMES['ray_start']:.1f} s ray.init)")


def test_ray_tuning_trials_match_local_validation(setup, ray_instance, tmp_path):
    from calibprompt.experiments.tune import run_tune
    from calibprompt.engine.validation import validation_metrics

    grid = Grid.load(setup["grid"]).override(["val_shots=2"], seeds=[1], only={"dataset": ["breast"]})
    tuned = run_tune(grid, tmp_path / "tune", trials=2, executor="ray", log=None,
                     cache_dir=str(setup["root"] / "cache-ray"))
    cell = tuned["cells"][0]
    assert cell["trials"] == 2
    cfg = grid.cell_config("tiny", "breast", {"name": "calibprompt"}, 2, 1, "calibprompt", apply_hparams=False)
    local = validation_metrics(cfg)  # trial 0 is the preset's defaults (alpha 0.1, lambda_as 1.0)
    assert cell["first_value"] == local["metrics"]["nll"]


class _Crash(BaseException):
    """Stands for the process dying (kill -9, power cut): nothing in the sweep catches it."""


def test_resume_after_a_crash_mid_grid(setup, local_sweep, monkeypatch):
    import calibprompt.methods.coop as training

    grid = Grid.load(setup["grid"]).override(only={"dataset": ["breast"]})
    specs = grid.expand()
    out = setup["root"] / "crash"
    cache = str(setup["root"] / "cache-local")
    real = training.train_prompts
    calls = []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_prompts", crashing)
    with pytest.raises(_Crash):
        run_sweep(grid, out, cache_dir=cache, log=None, batch=1)  # runs alone (test_sweep_batched: together)
    monkeypatch.setattr(training, "train_prompts", real)

    rows = _rows(out)
    assert [rows[s.config_hash]["status"] for s in specs] == ["done", "done", "running", "pending"]
    crashed = out / "runs" / specs[2].run_id
    assert (crashed / "config.yaml").is_file() and not (crashed / "metrics.json").exists()
    # debris a crash (or a careless copy) can leave: never counted as done
    (crashed / "metrics.json").write_text('{"status": "done", "config_hash": "' + specs[2].config_hash[:10])
    stray = out / "runs" / specs[3].run_id
    stray.mkdir(parents=True)
    (stray / "metrics.json").write_text(json.dumps({"status": "done", "config_hash": "f" * 64}))
    mtimes = [(out / "runs" / s.run_id / "metrics.json").stat().st_mtime_ns for s in specs[:2]]

    summary = run_sweep(grid, out, cache_dir=cache, log=None, batch=1)
    assert (summary.skipped, summary.executed, summary.done, summary.failed) == (2, 2, 4, 0)
    assert [(out / "runs" / s.run_id / "metrics.json").stat().st_mtime_ns for s in specs[:2]] == mtimes
    rows, reference = _rows(out), _rows(local_sweep["out"])
    for s in specs:  # the interrupted grid ends with the numbers of an uninterrupted (batched) one
        assert rows[s.config_hash]["status"] == "done"
        ours, theirs = rows[s.config_hash]["metrics"], reference[s.config_hash]["metrics"]
        assert ours.keys() == theirs.keys()
        # AURC ranks the confidences: rounding can swap two near-tied ones of this random model (1e-4 jumps)
        off = {k: (ours[k], theirs[k]) for k in ours
               if ours[k] != pytest.approx(theirs[k], abs=1e-3 if "aurc" in k else 1e-4, nan_ok=True)}
        assert not off
    assert rows[specs[2].config_hash]["attempts"] == 2

    # a done row whose metrics.json vanished runs again; a finished file the store missed is recovered
    (out / "runs" / specs[0].run_id / "metrics.json").unlink()
    store = ResultStore.for_dir(out)
    store.mark_running(read_sweep_file(out)["sweep_id"], specs[1].config_hash)
    store.close()
    summary = run_sweep(grid, out, cache_dir=cache, log=None, batch=1)
    assert (summary.skipped, summary.recovered, summary.executed, summary.done) == (2, 1, 1, 4)


def _md_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """{table title: {row label: {column: cell}}} of the Markdown report."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## ‡"):  # the list of flagged runs, not a table
            title = None
        elif line.startswith("## "):
            title, header = line[3:], None
            tables[title] = {}
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-:"):
                tables[title][cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables


def test_flagged_runs_are_listed_in_the_sweep_summary(local_sweep):
    """The tiny random model barely learns: its runs are flagged, in the summary as in their metrics.json."""
    summary = local_sweep["summary"]
    assert summary["flagged"]
    for entry in summary["flagged"]:
        recorded = json.loads((local_sweep["out"] / "runs" / entry["run_id"] / "metrics.json").read_text())
        assert entry["flags"] == [f["code"] for f in recorded["flags"]] and entry["flags"]


def test_report_tables_match_the_store_cell_by_cell(local_sweep, capsys, tmp_path):
    out = local_sweep["out"]
    assert main(["report", str(out), "--metrics", "accuracy,ece,nll"]) == 0
    capsys.readouterr()
    report = out / "report"
    rows = [r for r in _rows(out).values()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"]), []).append(r)

    with open(report / "results.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(groups) * 3
    md = (report / "tables.md").read_text()
    tables = _md_tables(md)
    assert len(tables) == 1
    (title, table), = tables.items()
    assert "tiny · 2 shots" in title and "seeds {1, 2}" in title
    flagged = {(r["dataset"], r["method"]) for r in rows if r["status"] == "done"
               and json.loads((Path(r["run_dir"]) / "metrics.json").read_text()).get("flags")}
    for rec in records:
        runs = groups[(rec["dataset"], rec["method"])]
        done = [r["metrics"][rec["metric"]] for r in runs if r["status"] == "done"]
        assert int(rec["n"]) == len(done) and int(rec["planned"]) == 2
        column = f"{rec['dataset']} {METRIC_INFO[rec['metric']][0]} {'↑' if METRIC_INFO[rec['metric']][1] else '↓'}"
        cell = table[rec["method"]][column]
        if not done:
            assert rec["mean"] == "" and cell == "–"
            continue
        mean = sum(done) / len(done)
        std = (sum((v - mean) ** 2 for v in done) / (len(done) - 1)) ** 0.5
        assert float(rec["mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert float(rec["std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
        scale, dec = (100, 2) if METRIC_INFO[rec["metric"]][2] else (1, 3)
        shown = f"{mean * scale:.{dec}f} ± {std * scale:.{dec}f}"
        if (rec["dataset"], rec["method"]) in flagged:  # a flagged cell is marked and never ranked
            shown += " ‡"
            assert rec["rank"] == ""
        assert rec["display"] == shown
        assert cell == {"1": f"**{shown}**", "2": f"_{shown}_", "": shown}[rec["rank"]]
    # the best and second best marks follow the displayed means (lower is better except accuracy)
    for metric in ("accuracy", "ece", "nll"):
        recs = [r for r in records if r["metric"] == metric and r["dataset"] == "breast"
                and ("breast", r["method"]) not in flagged]
        if len(recs) < 2:
            continue
        higher = METRIC_INFO[metric][1]
        shown = {r["method"]: float(r["display"].split(" ± ")[0]) for r in recs}
        best = max(shown.values()) if higher else min(shown.values())
        assert {r["method"] for r in recs if r["rank"] == "1"} == {m for m, v in shown.items() if v == best}

    assert main(["report", str(out), "--format", "md", "--metrics", "accuracy,ece,nll"]) == 0
    assert capsys.readouterr().out.strip() == md.strip()
    tex = (report / "tables.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\pm" in tex
    assert (r"\textbf{" in tex) == any(r["rank"] == "1" for r in records)
    html = (report / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", html)
    assert any("ece_accuracy" in i for i in images) and sum("reliability" in i for i in images) == 2
    assert all((report / i).is_file() for i in images)
    assert "Failed runs" in html and "does not exist" in html

    moved = tmp_path / "moved"  # a sweep folder that moved still finds its store
    shutil.copytree(out, moved)
    assert main(["report", str(moved), "--format", "csv", "--metrics", "accuracy,ece,nll"]) == 0
    assert capsys.readouterr().out == (report / "results.csv").read_text()


def test_conformal_columns_and_the_set_size_verdict_reach_the_report(local_sweep, capsys):
    out = local_sweep["out"]
    assert main(["report", str(out), "--format", "csv", "--metrics", "accuracy,cp_coverage,cp_set_size,aurc"]) == 0
    text = capsys.readouterr().out
    metrics = {row["metric"]: row for row in csv.DictReader(io.StringIO(text)) if row["mean"]}
    for name in ("cp_coverage", "cp_set_size", "aurc"):  # long format: one row per (cell, metric)
        assert name in metrics, sorted(metrics)
    assert 0 <= float(metrics["cp_coverage"]["mean"]) <= 100 and 0 <= float(metrics["cp_set_size"]["mean"]) <= 2
    assert main(["report", str(out), "--no-diagrams"]) == 0
    html = (out / "report" / "report.html").read_text()
    assert "Conformal prediction sets: CalibPrompt against CoOp-CE" in html
    claims = json.loads((out / "report" / "claims.json").read_text())
    assert {c["verdict"] for c in claims["claims"]} <= {"supported", "not supported", "inconclusive"}
    assert any(c["where"] == "tiny · breast · 2 shots" for c in claims["claims"])
    assert "The paper's claims, checked on these results" in html
    assert re.search(r"calibprompt: mean set size [\d.]+ vs [\d.]+ for coop-ce \((smaller|not smaller)\)", html)
    # every run's test-set bootstrap intervals (eval.bootstrap) reach intervals.csv and the HTML
    assert "Test-set uncertainty of each run" in html
    with open(out / "report" / "intervals.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and len(rows) == len(list((out / "runs").glob("*/metrics.json")))  # one per finished run
    for row in rows:
        assert float(row["ece_low"]) <= float(row["ece"]) + 1e-9 and float(row["ece"]) <= float(row["ece_high"]) + 1e-9
        assert float(row["accuracy_low"]) <= float(row["accuracy"]) <= float(row["accuracy_high"])
        assert row["n_resamples"] == "1000"
    # --json turns every printed result into one JSON document: the table, the written paths
    capsys.readouterr()
    assert main(["report", str(out), "--format", "md", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "md" and doc["text"].startswith("#")
    assert main(["report", str(out), "--no-diagrams", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"md", "tex", "csv", "html", "intervals"}
