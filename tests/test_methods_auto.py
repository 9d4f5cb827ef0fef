"""calibprompt-auto: alpha and lambda_AS chosen by cross-validation on the training shots only."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.config import load_config
from calibprompt.engine.run import run
from calibprompt.methods import resolve_method
from calibprompt.methods.coop_auto import held_out_ece
from tests.tiny_models import tiny_model_dir, write_image_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m"), "clip")


def _cfg(model, images, **extra):
    return load_config(None, base={"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)},
                                   "method": {"name": "calibprompt-auto"}, "shots": 4, "val_shots": 2,
                                   "train": {"epochs": 2, "batch_size": 4, "augment": False}, **extra})


def test_choice_uses_the_training_shots_only(model, tmp_path):
    """The same head and the same choice when the test images and the validation shots are replaced."""
    images = write_image_folder(tmp_path / "a", n_train=8, n_test=4)
    first = run(_cfg(model, images), tmp_path / "run-a", quiet=True)
    auto = first["train"]["auto"]
    assert len(auto["candidates"]) == 4 and auto["folds"] == 2
    best = max(c["accuracy"] for c in auto["candidates"])
    allowed = [c for c in auto["candidates"] if c["accuracy"] >= best - 0.01 - 1e-12]
    assert min(c["ece"] for c in allowed) == next(c["ece"] for c in auto["candidates"]
                                                  if (c["alpha"], c["lambda_as"]) == (auto["alpha"], auto["lambda_as"]))

    other = tmp_path / "b"
    shutil.copytree(images, other)
    rng = np.random.default_rng(9)
    for png in (other / "test").rglob("*.png"):  # new test images
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(png)
    second = run(_cfg(model, other), tmp_path / "run-b", quiet=True)
    assert second["train"]["auto"] == auto
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / r / "prompt.safetensors"))["ctx"] for r in ("run-a", "run-b"))
    assert torch.equal(a, b)


def test_validation_features_are_never_read(model, tmp_path):
    from calibprompt.engine import pipeline
    from calibprompt.methods import FitContext

    backbone = pipeline.loaded_backbone({"path": str(model)}, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    views = torch.randn(8, 1, 32, generator=gen)
    labels = torch.tensor([0, 1] * 4)
    zs = torch.nn.functional.normalize(torch.randn(2, 32, generator=gen), dim=-1)

    def fit(val):
        ctx = FitContext(backbone=backbone, classnames=["normal", "tumor"], train_views=views, labels=labels, zs_text=zs,
                         scale=100.0, seed=1, device=torch.device("cpu"),
                         train_cfg=load_config(None)["train"] | {"epochs": 2, "batch_size": 4, "warmup_lr": 1e-5},
                         prompt_cfg=load_config(None)["prompt"], val_features=val,
                         val_labels=None if val is None else torch.zeros(len(val), dtype=torch.long))
        torch.manual_seed(1)
        return resolve_method("calibprompt-auto").build().fit(ctx)

    plain, poisoned = fit(None), fit(torch.full((6, 32), float("nan")))
    assert plain.info["auto"] == poisoned.info["auto"] and torch.equal(plain.head.weight, poisoned.head.weight)


def test_parameters_and_too_few_shots(model, tmp_path):
    with pytest.raises(ValueError, match="alphas must be a non-empty list"):
        resolve_method("calibprompt-auto", alphas=[])
    with pytest.raises(ValueError, match="folds"):
        resolve_method("calibprompt-auto", folds=1)
    images = write_image_folder(tmp_path / "few", n_train=4, n_test=2)
    with pytest.raises(ValueError, match="3-fold cross-validation needs at least 3"):
        run(load_config(None, base={"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)},
                                    "method": {"name": "calibprompt-auto", "folds": 3}, "shots": 2,
                                    "train": {"epochs": 1, "batch_size": 2, "augment": False}}), tmp_path / "r", quiet=True)


def test_held_out_ece_by_hand():
    probs = torch.tensor([[0.85, 0.15], [0.75, 0.25], [0.35, 0.65], [0.55, 0.45], [0.58, 0.42]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])
    # one image per bin but the last two: 0.55 (right) and 0.58 (wrong) share (0.5, 0.6]
    expected = (abs(1 - 0.85) + abs(0 - 0.75) + abs(1 - 0.65) + 2 * abs(0.5 - (0.55 + 0.58) / 2)) / 5
    assert held_out_ece(probs, labels) == pytest.approx(expected)
