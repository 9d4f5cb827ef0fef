"""Shared setup of the fault-injection suite: one tiny model, one image folder, config writers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import tiny_model_dir, write_image_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"), "clip")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), n_train=6, n_test=4)


def write_config(path: Path, model: Path, images: Path, **extra) -> Path:
    cfg = {"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)},
           "method": {"name": "coop-ce"}, "shots": 2, "train": {"epochs": 2, "batch_size": 2}}
    for key, value in extra.items():
        cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``calibprompt ARGS`` in a fresh process (what a user runs), output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "calibprompt", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=kwargs.get("cwd", REPO))
