"""Every method preset runs through the core run pipeline (one epoch on a tiny CLIP model)."""

from __future__ import annotations

import pytest

from calibprompt.config import load_config
from calibprompt.features import FeatureCache
from calibprompt.methods import list_methods
from calibprompt.engine.run import run
from calibprompt.methods import resolve_method
from tests.tiny_models import tiny_model_dir, write_image_folder

PRESETS = [m["name"] for m in list_methods()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    return tiny_model_dir(root, "clip"), write_image_folder(root / "images", n_train=8, n_test=4), \
        FeatureCache(root / "cache")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end(preset, setup, tmp_path):
    model, images, cache = setup
    cfg = load_config(None, ["shots=4", "val_shots=2", "train.epochs=1", "train.batch_size=4"],
                      base={"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)},
                            "method": {"name": preset}})
    result = run(cfg, tmp_path / "run", quiet=True, cache=cache)
    assert result["status"] == "done" and result["method"] == preset
    assert 0.0 <= result["metrics"]["ece"] <= 1.0
    assert (result["train"].get("steps", 0) > 0) == resolve_method(preset).trains
