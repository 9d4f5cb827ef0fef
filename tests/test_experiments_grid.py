"""Grid specs (expansion, strict keys, per-cell overrides, presets, tuned hyper-parameters), the results
store and feature-cache determinism. Nothing here trains a model."""

from __future__ import annotations

import json
import pytest
import torch
import yaml

from calibprompt.cli import main
from calibprompt.config import config_hash, resolve
from calibprompt.experiments.grid import TUNED_FORMAT, Grid, GridError, list_presets
from calibprompt.experiments.store import ResultStore, public_url
from calibprompt.methods import PAPER_HPARAMS


def _spec(**extra):
    spec = {
        "name": "g",
        "base": {"train": {"epochs": 2}},
        "backbones": {"tiny": {"path": "/models/tiny"}, "other": {"path": "/models/other"}},
        "datasets": {"a": {"source": "medmnist", "path": "/data/a.npz"},
                     "b": {"source": "medmnist", "path": "/data/b.npz"}},
        "methods": ["coop-ce", "calibprompt"],
        "shots": [4],
        "seeds": [1, 2],
    }
    spec.update(extra)
    return spec


def test_expansion_order_labels_and_identity():
    specs = Grid.from_spec(_spec()).expand()
    assert len(specs) == 2 * 2 * 2 * 2
    first = specs[0]
    assert (first.backbone, first.dataset, first.method, first.shots, first.seed) == ("tiny", "a", "coop-ce", 4, 1)
    assert [s.seed for s in specs[:2]] == [1, 2]  # seed is the innermost axis
    for s in specs:
        resolved = resolve(s.config)
        assert config_hash(resolved) == s.config_hash and s.run_id == s.config_hash[:16]
        assert resolved["train"]["epochs"] == 2
        assert resolved["backbone"]["path"] == f"/models/{s.backbone}"
        assert resolved["data"]["path"] == f"/data/{s.dataset}.npz"
    assert len({s.config_hash for s in specs}) == len(specs)


def test_sweep_keys_apply_only_to_methods_that_take_them():
    specs = Grid.from_spec(_spec(sweep={"method.alpha": [0.05, 0.2], "train.lr": [0.002, 0.001]},
                                 backbones={"tiny": {"path": "/m"}}, datasets={"a": {"source": "medmnist",
                                                                                     "path": "/d.npz"}})).expand()
    ce = [s for s in specs if s.method == "coop-ce"]
    cp = [s for s in specs if s.method == "calibprompt"]
    assert len(ce) == 2 * 2 and len(cp) == 2 * 2 * 2  # lr for both, alpha only for calibprompt
    assert {tuple(sorted(s.variant)) for s in ce} == {("train.lr",)}
    assert {(s.variant["method.alpha"], s.variant["train.lr"]) for s in cp if s.seed == 1} == {
        (0.05, 0.002), (0.05, 0.001), (0.2, 0.002), (0.2, 0.001)}
    for s in cp:
        r = resolve(s.config)
        assert r["method"]["alpha"] == s.variant["method.alpha"] and r["train"]["lr"] == s.variant["train.lr"]
    with pytest.raises(GridError, match="apply to none"):
        Grid.from_spec(_spec(sweep={"method.gamma": [1, 2]}))
    only_ce = Grid.from_spec(_spec(sweep={"method.alpha": [0.1, 0.2]})).override(only={"method": ["coop-ce"]})
    assert len(only_ce.expand()) == 2 * 2 * 2  # --only may leave a sweep key without takers


def test_cells_override_per_backbone_and_dataset():
    grid = Grid.from_spec(_spec(cells=[
        {"backbone": "tiny", "dataset": "b", "set": {"method.alpha": 0.3, "train.epochs": 5}},
        {"dataset": "a", "method": "coop-ce", "set": {"train.lr": 0.01}},
    ]))
    for s in grid.expand():
        r = resolve(s.config)
        if s.backbone == "tiny" and s.dataset == "b":
            assert r["train"]["epochs"] == 5
            assert r["method"].get("alpha") == (0.3 if s.method == "calibprompt" else None)
        else:
            assert r["train"]["epochs"] == 2 and r["method"].get("alpha") is None
        assert r["train"]["lr"] == (0.01 if (s.dataset, s.method) == ("a", "coop-ce") else 0.002)
    with pytest.raises(GridError, match="not a parameter"):
        Grid.from_spec(_spec(cells=[{"method": "coop-ce", "set": {"method.alpha": 0.1}}])).expand()


def test_strict_keys_and_clear_errors():
    with pytest.raises(GridError, match="unknown grid key.*seed"):
        Grid.from_spec(_spec(seed=[1]))
    with pytest.raises(GridError, match="unknown backbone label"):
        Grid.from_spec(_spec(pairs={"nope": ["a"]}))
    with pytest.raises(GridError, match="unknown dataset label"):
        Grid.from_spec(_spec(cells=[{"dataset": "zz", "set": {"train.lr": 1}}]))
    with pytest.raises(GridError, match="unknown key.*'sets'"):
        Grid.from_spec(_spec(cells=[{"sets": {"train.lr": 1}}]))
    with pytest.raises(GridError, match="base.seed is a grid axis"):
        Grid.from_spec(_spec(base={"seed": 3}))
    with pytest.raises(GridError, match="train.epoch"):
        Grid.from_spec(_spec(base={"train": {"epoch": 3}})).expand()
    with pytest.raises(GridError, match="no parameter 'gamma'"):
        Grid.from_spec(_spec(methods={"x": {"name": "calibprompt", "gamma": 2}})).expand()
    with pytest.raises(GridError, match="unknown method"):
        Grid.from_spec(_spec(methods=["coop-nope"])).expand()
    with pytest.raises(GridError, match="non-empty list"):
        Grid.from_spec(_spec(sweep={"train.lr": 0.1}))
    with pytest.raises(GridError, match="'seeds' must be"):
        Grid.from_spec(_spec(seeds="1,2"))


def test_pairs_dedupe_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grid = Grid.from_spec(_spec(pairs={"tiny": ["a"], "other": ["b"]},
                                backbones={"tiny": {"path": "models/tiny"}, "other": {"path": "models/other"}},
                                methods={"ce": {"name": "coop-ce"}, "ce2": {"name": "coop-ce"}}))
    specs = grid.expand()
    assert {(s.backbone, s.dataset) for s in specs} == {("tiny", "a"), ("other", "b")}
    assert grid.duplicates == 4 and {s.method for s in specs} == {"ce"}  # same config -> run once
    assert specs[0].config["backbone"]["path"] == str(tmp_path / "models" / "tiny")


def test_paper_preset_reproduces_the_tables_protocol(monkeypatch):
    monkeypatch.setenv("CALIBPROMPT_MODELS", "/models")
    monkeypatch.setenv("CALIBPROMPT_PAPER_DATA", "/datasets")
    assert "paper" in list_presets()
    specs = Grid.load("paper").expand()
    pairs = {(s.backbone, s.dataset) for s in specs}
    assert len(pairs) == 10 and len(specs) == 10 * 16
    assert {s.seed for s in specs} == {1} and {s.shots for s in specs} == {8}
    names = {"MedCLIP": "medclip-vit", "BiomedCLIP": "biomedclip", "PLIP": "plip", "QuiltNet": "quiltnet-b32"}
    for s in specs:
        r = resolve(s.config)
        assert (r["train"]["epochs"], r["train"]["batch_size"], r["train"]["lr"], r["prompt"]["n_ctx"]) == (50, 16, 0.002, 16)
        assert r["data"] == {"source": "paper", "path": "/datasets", "name": s.dataset}
        if s.method == "calibprompt":
            alpha, lam = PAPER_HPARAMS[(names[s.backbone], s.dataset.lower())]
            assert (r["method"]["alpha"], r["method"]["lambda_as"]) == (alpha, lam)
        else:  # the paper's values are CalibPrompt's only; other methods keep their preset defaults
            assert "alpha" not in r["method"] and "lambda_as" not in r["method"]
    monkeypatch.delenv("CALIBPROMPT_MODELS")
    with pytest.raises(GridError, match="unset environment variable.*CALIBPROMPT_MODELS"):
        Grid.load("paper").expand()


def test_tuned_hparams_feed_the_grid(tmp_path):
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(yaml.safe_dump({"format": TUNED_FORMAT, "method": "calibprompt", "objective": "val_nll",
                                     "cells": [{"backbone": "tiny", "dataset": "b",
                                                "set": {"method.alpha": 0.07, "method.lambda_as": 0.3,
                                                        "train.lr": 0.004}}]}))
    specs = Grid.from_spec(_spec(hparams=str(tuned))).expand()
    for s in specs:
        r = resolve(s.config)
        tuned_cell = (s.backbone, s.dataset, s.method) == ("tiny", "b", "calibprompt")
        assert r["method"].get("alpha") == (0.07 if tuned_cell else None)
        assert r["train"]["lr"] == (0.004 if tuned_cell else 0.002)
    # a sweep value wins over the tuned one
    specs = Grid.from_spec(_spec(hparams=str(tuned), sweep={"method.alpha": [0.5]})).expand()
    assert {resolve(s.config)["method"]["alpha"] for s in specs if s.method == "calibprompt"} == {0.5}
    (tmp_path / "bad.yaml").write_text("cells: []\n")
    with pytest.raises(GridError, match="not a tuned.yaml"):
        Grid.from_spec(_spec(hparams=str(tmp_path / "bad.yaml"))).expand()


def test_overrides_from_the_command_line():
    grid = Grid.from_spec(_spec()).override(["train.epochs=7", "val_shots=2"], seeds=[5], shots=[2, 4],
                                           only={"backbone": ["tiny"], "method": ["calibprompt"]})
    specs = grid.expand()
    assert {(s.backbone, s.method, s.seed) for s in specs} == {("tiny", "calibprompt", 5)}
    assert sorted({s.shots for s in specs}) == [2, 4]
    assert {resolve(s.config)["train"]["epochs"] for s in specs} == {7}
    with pytest.raises(GridError, match="grid axis"):
        Grid.from_spec(_spec()).override(["seed=3"])
    with pytest.raises(GridError, match="unknown label"):
        Grid.from_spec(_spec()).override(only={"dataset": ["zz"]})


def test_cli_dry_run_lists_runs(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(_spec()))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--seeds", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "8 runs" and all("seed 3" in line for line in lines[:-1])
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--seeds", "3", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert len(planned["runs"]) == 8 and all("seed 3" in r["title"] for r in planned["runs"])
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--jobs", "0"]) == 2
    assert "--jobs must be a whole number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the folder was locked
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a file nor a preset" in capsys.readouterr().err


def test_store_schema_and_done_guard(tmp_path):
    spec = Grid.from_spec(_spec()).expand()[0]
    store = ResultStore.for_dir(tmp_path)
    assert store.url == f"sqlite:///{tmp_path / 'results.sqlite'}"
    store.ensure_sweep("s1", "g", str(tmp_path), {"k": 1})
    row = store.plan("s1", spec, 0, str(tmp_path / "runs" / spec.run_id))
    assert row["status"] == "pending" and row["run_id"] == spec.run_id and row["attempts"] == 0
    store.mark_running("s1", spec.config_hash, worker="w")
    assert store.get("s1", spec.config_hash)["attempts"] == 1
    with pytest.raises(ValueError, match="refusing"):
        store.mark_done("s1", spec.config_hash, {"status": "done", "config_hash": "0" * 64, "metrics": {}})
    result = {"status": "done", "config_hash": spec.config_hash, "metrics": {"ece": 0.1, "nll": float("nan")},
              "timings": {"total": 1.0}, "versions": {}, "config": {}}
    store.mark_done("s1", spec.config_hash, result)
    row = store.get("s1", spec.config_hash)
    assert row["status"] == "done" and row["ece"] == 0.1 and row["nll"] is None and row["metrics"]["nll"] is None
    assert store.counts("s1") == {"pending": 0, "running": 0, "done": 1, "failed": 0}
    store.close()
    assert public_url("postgresql://user:secret@db/x") == "postgresql://user:***@db/x"


def test_feature_cache_does_not_depend_on_history(tmp_path):
    """A feature must not depend on which other images were encoded in the same batch (otherwise the
    same run gives different numbers depending on which runs went before, e.g. locally vs on Ray)."""
    from calibprompt.backbones import load_backbone
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache
    from tests.conftest import require_shared
    from tests.tiny_models import tiny_model_dir

    data = open_dataset({"source": "medmnist", "path": str(require_shared("medmnist/breastmnist.npz"))})
    backbone = load_backbone({"path": str(tiny_model_dir(tmp_path, "clip"))})
    test = data.samples_in("test")[:40]
    fresh = FeatureCache(tmp_path / "c1").features(backbone, data, test)
    cache = FeatureCache(tmp_path / "c2")
    cache.features(backbone, data, test[3:20])
    cache.features(backbone, data, test[30:33], view=None)
    assert torch.equal(cache.features(backbone, data, test), fresh)


def test_ablation_presets_expand_the_shots_and_context_axes(monkeypatch):
    monkeypatch.setenv("CALIBPROMPT_MODELS", "/models")
    monkeypatch.setenv("CALIBPROMPT_PAPER_DATA", "/datasets")
    assert {"ablation-shots", "ablation-ctx"} <= set(list_presets())
    shots = Grid.load("ablation-shots").expand()
    assert len(shots) == 10 * 4 * 5 * 3 and {s.shots for s in shots} == {1, 2, 4, 8, 16}
    assert {s.method for s in shots} == {"coop-ce", "coop-ce+ts", "calibprompt", "calibprompt+ts"}
    ctx = Grid.load("ablation-ctx").expand()
    assert len(ctx) == 10 * 4 * 4 * 3 and {s.shots for s in ctx} == {8}
    assert {resolve(s.config)["prompt"]["n_ctx"] for s in ctx} == {4, 8, 16, 32}
    assert {s.variant_key for s in ctx} == {"prompt.n_ctx=4", "prompt.n_ctx=8", "prompt.n_ctx=16", "prompt.n_ctx=32"}
    one = Grid.load("ablation-ctx").override(n_ctx=[2, 64], only={"backbone": ["PLIP"], "dataset": ["Kather"]})
    assert {resolve(s.config)["prompt"]["n_ctx"] for s in one.expand()} == {2, 64}


def test_the_context_axis_applies_to_prompt_learners_only(tmp_path):
    spec = {"backbones": {"tiny": {"path": str(tmp_path)}}, "datasets": {"d": {"source": "folder", "path": str(tmp_path)}},
            "methods": ["coop-ce", "clap", "zeroshot"], "n_ctx": [4, 8], "seeds": 1}
    specs = Grid.from_spec(spec).expand()
    per_method = {m: sorted(resolve(s.config)["prompt"]["n_ctx"] for s in specs if s.method == m) for m in spec["methods"]}
    assert per_method == {"coop-ce": [4, 8], "clap": [16], "zeroshot": [16]}
    with pytest.raises(GridError, match="either as n_ctx or as sweep"):
        Grid.from_spec({**spec, "sweep": {"prompt.n_ctx": [2]}})
    with pytest.raises(GridError, match="apply to none of the methods"):
        Grid.from_spec({**spec, "methods": ["clap"]})
