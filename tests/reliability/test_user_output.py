"""What a user sees (docs/reliability.md): plain progress lines off a terminal, notes once each and
without Python source lines, a progress callback for API callers, MedMNIST found by name, and the note
about random crops on small images."""

from __future__ import annotations

import io
import logging

import pytest

from calibprompt import progress as progress_module
from calibprompt.config import load_config
from calibprompt.data import open_dataset
from calibprompt.engine.run import run
from tests.conftest import require_shared
from tests.reliability.conftest import cli, write_config


def test_progress_off_a_terminal_is_plain_lines(monkeypatch):
    import logging

    stream = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", stream)  # not a terminal: lines, not a bar
    handler = logging.StreamHandler(stream)  # progress lines are INFO records of the calibprompt logger
    monkeypatch.setattr(progress_module, "console_level", logging.INFO)
    previous = progress_module.log.level
    progress_module.log.addHandler(handler)
    progress_module.log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears logging's level cache
    try:
        bar = progress_module.progress(100, "encoding images")
        for _ in range(100):
            bar.update(1)
        bar.close()
    finally:
        progress_module.log.removeHandler(handler)
        progress_module.log.setLevel(previous)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "encoding images: 0/100 (0%)" and lines[-1] == "encoding images: 100/100 (100%)"
    assert 4 <= len(lines) <= 7  # start, each quarter, end: never one line per update
    assert progress_module.progress(5, "x", enabled=False) is None


def test_api_callers_get_progress_through_a_callback(tmp_path, model, images):
    seen = []
    progress_module.set_progress_callback(lambda desc, done, total: seen.append((desc, done, total)))
    try:
        run(load_config(write_config(tmp_path / "c.yaml", model, images)), tmp_path / "run")
    finally:
        progress_module.set_progress_callback(None)
    descs = {d for d, _, _ in seen}
    assert any(d.startswith("encoding") for d in descs) and any(d.startswith("prompt tuning") for d in descs)
    last = {d: (done, total) for d, done, total in seen}
    assert all(done == total for done, total in last.values())


def test_cli_notes_are_one_plain_line_each(tmp_path, model, images):
    cfg = write_config(tmp_path / "c.yaml", model, images, method={"name": "calibprompt", "alpha": 0.1},
                       train={"epochs": 2, "batch_size": 4})  # 2 shots x 2 classes = one balanced batch
    result = cli("train", str(cfg), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("calibprompt: note: SMAC alpha")]
    assert len(notes) == 1
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr and "\r" not in result.stderr


def test_small_images_with_random_crops_get_a_note(tmp_path, model, caplog):
    npz = require_shared("medmnist/breastmnist.npz")
    cfg = load_config(None, ["shots=2", "train.epochs=1", "train.batch_size=4", "train.n_views=1"],
                      base={"backbone": {"path": str(model)}, "data": {"source": "medmnist", "path": str(npz)},
                            "method": {"name": "coop-ce"}})
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        run(cfg, tmp_path / "run", quiet=True)
    assert any("28x28 images, about 8x8 pixels" in r.getMessage() and "train.augment: false" in r.getMessage()
               for r in caplog.records)


def test_medmnist_by_name_is_found_through_the_data_setting():
    require_shared("medmnist/pneumoniamnist.npz")
    ds = open_dataset({"source": "medmnist", "name": "pneumoniamnist"})
    assert ds.name == "pneumoniamnist" and len(ds) == 5856


def test_medmnist_by_name_missing_offline_says_where_to_put_it(tmp_path, monkeypatch):
    from calibprompt.data import DataError

    monkeypatch.setenv("CALIBPROMPT_DATA", str(tmp_path))
    monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "medmnist", None)  # as if the package were absent
    with pytest.raises(DataError, match="dermamnist.npz not found"):
        open_dataset({"source": "medmnist", "name": "dermamnist"})
