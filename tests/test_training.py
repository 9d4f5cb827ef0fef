"""Training schedule and config identity."""

from __future__ import annotations

import math

import pytest

from calibprompt.config import ConfigError, config_hash, load_config, parse_override
from calibprompt.methods.prompt_training import TrainSettings


def test_lr_schedule_matches_dassl_warmup_recount():
    s = TrainSettings()
    assert s.lr_at(0) == 1e-5
    assert s.lr_at(1) == pytest.approx(0.002)
    assert s.lr_at(49) == pytest.approx(0.001 * (1 + math.cos(math.pi * 48 / 50)))
    assert s.lr_at(49) == pytest.approx(7.9e-6, rel=0.01)


def test_invalid_optimizer():
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="rmsprop").validate()


def test_unknown_config_keys_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shots: 4\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config key 'seeds'"):
        load_config(None, ["seeds=3"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["train.epochs=3", "prompt.init=a photo of", "train.lr=1e-3"])
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["lr"] == 1e-3
    assert cfg["prompt"]["init"] == "a photo of"


def test_hash_changes_with_hyperparameters_not_with_device():
    base = {"backbone": {"path": "m"}, "data": {"source": "folder", "path": "d"}}
    a = load_config(None, base=base)
    b = load_config(None, ["train.lr=0.003"], base=base)
    c = load_config(None, ["device=cuda"], base=base)
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(c)
