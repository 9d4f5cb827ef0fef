"""Plug-ins: a package installed on a path, declaring a ``calibprompt.plugins`` entry point, adds a loss
that ``train`` and ``sweep`` then use by name, in a fresh process that imports nothing by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.tiny_models import tiny_model_dir, write_image_folder

PLUGIN = '''
from calibprompt.losses import Loss, LossInputs, register_loss


@register_loss
class MeanConfidence(Loss):
    """Mean top-class probability: with a positive weight it pulls confidence down."""

    name = "MEAN_CONF"
    kind = "calibration"
    formula = "mean_i max_k p_ik"

    def compute(self, x: LossInputs):
        return x.logits.softmax(dim=-1).max(dim=-1).values.mean()
'''


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    site = root / "site"
    (site / "cp_plugin_demo").mkdir(parents=True)
    (site / "cp_plugin_demo" / "__init__.py").write_text(PLUGIN)
    dist = site / "cp_plugin_demo-0.1.dist-info"  # what `pip install` leaves: metadata and entry points
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cp-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[calibprompt.plugins]\ndemo = cp_plugin_demo\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CALIBPROMPT_CACHE": str(root / "cache")}
    model = tiny_model_dir(root / "model", "clip")
    images = write_image_folder(root / "images", n_train=8, n_test=6)
    base = {"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)}, "shots": 2,
            "method": "custom", "losses": [{"name": "CE"}, {"name": "mean-conf", "weight": 0.5}],
            "train": {"epochs": 2, "batch_size": 2}, "eval": {"bootstrap": 0}}
    return {"root": root, "env": env, "base": base}


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "calibprompt", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_plugin_loss_runs_through_train_and_sweep(plugin_env):
    root, env = plugin_env["root"], plugin_env["env"]
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(plugin_env["base"]))
    done = _cli(env, "train", str(config), "--out", str(root / "run"), "--json", "-q")
    assert done.returncode == 0, done.stderr
    result = json.loads((root / "run" / "metrics.json").read_text())
    assert [t["name"] for t in result["config"]["resolved_method"]["losses"]] == ["CE", "MEAN_CONF"]
    assert 0.0 <= json.loads(done.stdout)["ece"] <= 1.0

    grid = root / "grid.yaml"
    base = {k: v for k, v in plugin_env["base"].items() if k not in ("backbone", "data", "shots", "method", "losses")}
    grid.write_text(yaml.safe_dump({"name": "plugin", "base": base, "shots": 2, "seeds": [1, 2],
                                    "backbones": {"tiny": plugin_env["base"]["backbone"]},
                                    "datasets": {"imgs": plugin_env["base"]["data"]},
                                    "methods": {"LP+MEAN_CONF": {"name": "linear-probe", "C": 1.0,
                                                                     "losses": ["CE", {"name": "mean_conf", "weight": 0.5}]}}}))
    done = _cli(env, "sweep", str(grid), "--out", str(root / "sweep"), "--json", "-q")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["done"] == 2 and summary["failed"] == 0

    listed = _cli(env, "train", str(config), "--out", str(root / "run2"), "--set", "losses=[{name: MEAN_CONFX}]")
    assert listed.returncode == 2 and "MEAN_CONF" in listed.stderr  # the plug-in's name is among the valid ones


def test_without_the_plugin_the_name_is_unknown(plugin_env):
    env = {**plugin_env["env"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    config = plugin_env["root"] / "alone.yaml"
    config.write_text(yaml.safe_dump(plugin_env["base"]))
    done = _cli(env, "config", "validate", str(config))
    assert done.returncode == 2 and "unknown loss 'mean-conf'" in done.stderr


def test_register_loss_rejects_clashes():
    from calibprompt.losses import Loss, register_loss

    with pytest.raises(ValueError, match="unique upper-case name"):
        register_loss(type("Dup", (Loss,), {"name": "CE", "kind": "task"}))
    with pytest.raises(ValueError, match="Loss subclass"):
        register_loss(object)
