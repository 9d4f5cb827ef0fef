"""End to end: `calibprompt train` / `eval` on tiny randomly initialised open_clip models of both text
families over images written to a temporary folder; feature-cache reuse; run identity by config hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from calibprompt.cli import main
from calibprompt.config import load_config
from calibprompt.features import FeatureCache
from calibprompt.engine.artifacts import RunConflict
from calibprompt.engine.run import run
from tests.tiny_models import tiny_model_dir, write_image_folder

EPOCHS = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), n_train=10, n_test=6)


@pytest.fixture(scope="module", params=["clip", "bert"])
def model_dir(request, tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param)


def _config(tmp_path, model_dir, images, method="calibprompt", **extra):
    text = (
        f"backbone: {{path: {model_dir}}}\n"
        f"data: {{source: folder, path: {images}}}\n"
        f"method: {{name: {method}}}\n"
        f"shots: 4\n"
        f"train: {{epochs: {EPOCHS}, batch_size: 4}}\n"
    )
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    path = tmp_path / f"{method}.yaml"
    path.write_text(text)
    return path


def test_train_cli_writes_all_outputs(tmp_path, model_dir, images, capsys):
    cfg = _config(tmp_path, model_dir, images)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--json", "-v", "--set", "method.alpha=0.05"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)  # --json: stdout is one JSON document, nothing else
    assert summary["intervals"]["ece"][0] <= summary["ece"] <= summary["intervals"]["ece"][1] + 1e-12
    assert "calibprompt: debug: run " in printed.err  # -v shows debug detail on stderr
    log = (out / "log.txt").read_text()  # every run folder keeps its log
    assert " DEBUG calibprompt: run " in log and " INFO calibprompt: encoding " in log
    assert main(["train", str(cfg), "--out", str(out), "-qq", "--set", "method.alpha=0.05"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and printed.out.startswith("run ")  # reused; -qq: nothing on stderr
    assert "reusing finished run" in (out / "log.txt").read_text()
    for name in ("metrics.json", "prompt.safetensors", "reliability.png", "predictions.csv", "split.json",
                 "config.yaml"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    assert result["status"] == "done" and result["seed"] == 1
    assert result["config"]["method"]["alpha"] == 0.05
    assert [spec["name"] for spec in result["config"]["resolved_method"]["losses"]] == ["LS", "SMAC", "AS"]
    assert result["train"]["steps"] == EPOCHS * 2  # 8 training images, batch 4, drop_last
    assert set(result["versions"]) >= {"torch", "open_clip_torch", "calibprompt"}
    for key in ("accuracy", "ece", "mce", "ace", "nll", "brier"):
        assert 0.0 <= result["metrics"][key] <= (10.0 if key == "nll" else 1.0)
        assert summary[key] == result["metrics"][key]
    assert "ece_kde" in result["metrics_reference"]
    ctx = load_file(str(out / "prompt.safetensors"))["ctx"]
    assert ctx.shape == (16, 64)
    rows = (out / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 12 and rows[0].startswith("ref,label,prediction,prob_normal,prob_tumor")
    probs = np.array([[float(v) for v in r.split(",")[3:]] for r in rows[1:]])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)


def test_feature_cache_encodes_each_image_once(tmp_path, model_dir, images):
    cache = FeatureCache(tmp_path / "cache")
    cfg = load_config(_config(tmp_path, model_dir, images))
    first = run(cfg, tmp_path / "a", quiet=True, cache=cache)
    n_train, n_test = 8, 12
    assert first["images_encoded"] == n_test + n_train * EPOCHS  # one view per epoch
    # Another method and seed reuse every test feature; the new seed picks other shots, whose
    # views are new unless already encoded.
    second = run(load_config(None, ["method.name=coop-ce"], base=cfg), tmp_path / "b", quiet=True, cache=cache)
    assert second["images_encoded"] == 0
    # A fresh process-level cache on the same folder reads everything from disk.
    disk = FeatureCache(tmp_path / "cache")
    third = run(load_config(None, ["method.name=coop-ls"], base=cfg), tmp_path / "c", quiet=True, cache=disk)
    assert third["images_encoded"] == 0 and disk.hits > 0


def test_runs_are_deterministic_and_identified_by_config_hash(tmp_path, model_dir, images):
    cfg = load_config(_config(tmp_path, model_dir, images))
    a = run(cfg, tmp_path / "a", quiet=True)
    b = run(cfg, tmp_path / "b", quiet=True, cache=FeatureCache(tmp_path / "other-cache"))
    assert a["config_hash"] == b["config_hash"]
    assert a["metrics"] == b["metrics"]
    ctx_a = load_file(str(tmp_path / "a" / "prompt.safetensors"))["ctx"]
    ctx_b = load_file(str(tmp_path / "b" / "prompt.safetensors"))["ctx"]
    assert torch.equal(ctx_a, ctx_b)
    # Same config again: reused, not retrained (the file is untouched).
    stamp = (tmp_path / "a" / "metrics.json").stat().st_mtime_ns
    assert run(cfg, tmp_path / "a", quiet=True)["config_hash"] == a["config_hash"]
    assert (tmp_path / "a" / "metrics.json").stat().st_mtime_ns == stamp
    # A changed hyper-parameter can never reuse the old prompts.
    changed = load_config(None, ["train.lr=0.004"], base=cfg)
    with pytest.raises(RunConflict, match="another configuration"):
        run(changed, tmp_path / "a", quiet=True)
    c = run(changed, tmp_path / "a", quiet=True, overwrite=True)
    assert c["config_hash"] != a["config_hash"]


def test_interrupted_result_is_never_taken_as_done(tmp_path, model_dir, images):
    cfg = load_config(_config(tmp_path, model_dir, images))
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"status": "do')  # half-written by a killed process
    result = run(cfg, out, quiet=True)
    assert result["status"] == "done"
    assert json.loads((out / "metrics.json").read_text())["config_hash"] == result["config_hash"]


def test_zero_shot_eval_and_saved_prompt_eval(tmp_path, model_dir, images):
    cfg = _config(tmp_path, model_dir, images, method="zeroshot")
    assert main(["eval", str(cfg), "--out", str(tmp_path / "zs"), "--quiet"]) == 0
    zs = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert zs["method"] == "zeroshot" and zs["train"] == {}
    assert not (tmp_path / "zs" / "prompt.safetensors").exists()
    trained_cfg = _config(tmp_path, model_dir, images)
    assert main(["train", str(trained_cfg), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert main(["eval", str(trained_cfg), "--out", str(tmp_path / "e"), "--quiet",
                 "--prompt", str(tmp_path / "t" / "prompt.safetensors")]) == 0
    trained = json.loads((tmp_path / "t" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert evaluated["metrics"] == pytest.approx(trained["metrics"], abs=1e-9)


def test_unknown_loss_and_bad_keys_are_clear_errors(tmp_path, model_dir, images, capsys):
    cfg = _config(tmp_path, model_dir, images)
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", "method.name=coop-xyz"]) == 2
    assert "coop-xyz" in capsys.readouterr().err
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", "train.epoch=2"]) == 2
    assert "train.epoch" in capsys.readouterr().err
