"""Faults 4-6 and 8 (docs/reliability.md): damaged weights, odd data, bad configs, and errors a user
meets at the command line -- each one clear line naming the file, key or flag, before any work."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from calibprompt.backbones import WeightsError, load_backbone
from calibprompt.cli import main
from calibprompt.data import DataError, open_dataset
from tests.conftest import require_shared
from tests.reliability.conftest import cli, write_config


# ----------------------------------------------------------------------------------------------- weights
def _copy(model, tmp_path):
    folder = tmp_path / "w"
    shutil.copytree(model, folder)
    return folder, folder / "open_clip_model.safetensors"


@pytest.mark.parametrize("fault,expected", [
    ("missing", "missing keys: logit_scale"),
    ("shape", "shape keys: positional_embedding"),
    ("nan", "weight tensor 'model.visual.proj' holds"),
    ("truncated", "damaged or incomplete"),
])
def test_damaged_weights_are_named(fault, expected, model, tmp_path):
    folder, weights = _copy(model, tmp_path)
    state = load_file(str(weights))
    if fault == "missing":
        del state["logit_scale"]
    elif fault == "shape":
        state["positional_embedding"] = torch.zeros(5, 5)
    elif fault == "nan":
        state["visual.proj"][0, 0] = float("nan")
    if fault == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 3])
    else:
        save_file(state, str(weights))
    with pytest.raises(WeightsError, match=expected.replace("(", r"\(")):
        load_backbone({"path": str(folder)})


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/calibprompt-pwned",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    path = tmp_path / "model.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Payload()}, handle)
    if os.path.exists("/tmp/calibprompt-pwned"):
        os.remove("/tmp/calibprompt-pwned")
    with pytest.raises(WeightsError, match="weights-only torch checkpoint"):
        load_backbone({"path": str(path), "name": "clip-vit-b32"})
    assert not os.path.exists("/tmp/calibprompt-pwned")


def test_hub_id_offline_fails_fast_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="offline \\(HF_HUB_OFFLINE\\)"):
        load_backbone({"hub_id": "hf-hub:someone/some-model"})
    assert time.perf_counter() - start < 10


def test_hub_that_never_answers_fails_within_the_timeout(tmp_path, images):
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(4)), daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_OFFLINE": "0",
           "CALIBPROMPT_HUB_TIMEOUT": "2", "HF_HUB_CACHE": str(tmp_path / "empty")}
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(yaml.safe_dump({"backbone": {"hub_id": "hf-hub:someone/silent"},
                                   "data": {"source": "folder", "path": str(images)}, "shots": 2}))
    start = time.perf_counter()
    result = cli("eval", str(cfg), "--out", str(tmp_path / "o"), "--set", "method=zeroshot", env=env, timeout=120)
    assert time.perf_counter() - start < 60
    assert result.returncode == 2 and "did not answer within 2 s" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Traceback" not in result.stderr
    server.close()


# -------------------------------------------------------------------------------------------------- data
def _tree(root, counts):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_corrupt_zero_byte_and_non_image_files_are_named_or_counted(tmp_path):
    root = _tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="broken.png") as err:
        open_dataset({"source": "folder", "path": str(root)})
    assert "empty.png" in str(err.value) and "skip_bad" in str(err.value)
    ds = open_dataset({"source": "folder", "path": str(root), "skip_bad": True})
    assert len(ds) == 6 and len(ds.skipped) == 2
    (root / "a" / "notes.txt").write_text("a note")
    assert len(open_dataset({"source": "folder", "path": str(root), "skip_bad": True})) == 6


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "L", "LA"])
def test_16_bit_alpha_and_grey_pngs_read_as_rgb(mode, tmp_path):
    root = _tree(tmp_path / "d", {"a": 1, "b": 1})
    if mode == "I;16":
        array = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200)
        Image.fromarray(array).save(root / "a" / "x.png")  # a 16-bit grey PNG
    else:
        Image.new(mode, (16, 16), 128 if mode in ("L", "LA") else (10, 20, 30, 128)).save(root / "a" / "x.png")
    ds = open_dataset({"source": "folder", "path": str(root)})
    image = ds.load(next(s for s in ds.samples if s.ref.endswith("x.png")))
    assert image.mode == "RGB" and image.size == (16, 16)
    if mode == "I;16":
        pixels = np.asarray(image)[..., 0]
        assert pixels.min() == 0 and pixels.max() == 255  # scaled, not clipped to white


def test_csv_with_missing_paths_or_unknown_labels_names_the_row(tmp_path):
    root = _tree(tmp_path / "d", {"a": 2, "b": 2})
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nd/a/0.png,a\nd/b/0.png,b\nd/missing.png,a\n")
    with pytest.raises(DataError, match="missing.png"):
        open_dataset({"source": "csv", "path": str(manifest)})
    manifest.write_text("path,label\nd/a/0.png,a\nd/b/0.png,b\n")
    ds = open_dataset({"source": "csv", "path": str(manifest), "classnames": ["a", "b"]})
    assert len(ds) == 2
    manifest.write_text("path,label\nd/a/0.png,a\nd/b/0.png,zebra\n")
    with pytest.raises(DataError, match="zebra"):
        open_dataset({"source": "csv", "path": str(manifest), "classnames": ["a", "b"]})
    assert root.is_dir()


def test_npz_without_split_or_with_one_class_is_refused(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "nosplit.npz", images=x, labels=np.zeros(4))
    with pytest.raises(DataError, match="train_images"):
        open_dataset({"source": "medmnist", "path": str(tmp_path / "nosplit.npz"), "classnames": ["a", "b"]})
    _tree(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match="has 1 class"):
        open_dataset({"source": "folder", "path": str(tmp_path / "one")})


@pytest.mark.parametrize("kind", ["float01", "float255", "uint16", "uint12"])
def test_npz_pixel_types_read_as_the_same_pictures(kind, tmp_path):
    src = require_shared("medmnist/breastmnist.npz")
    reference = open_dataset({"source": "medmnist", "path": str(src)})
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for split in ("train", "val", "test"):
        x = arrays[f"{split}_images"].astype(np.float64)
        arrays[f"{split}_images"] = {"float01": (x / 255).astype(np.float32), "float255": x.astype(np.float32),
                                     "uint16": (x * 257).astype(np.uint16),
                                     "uint12": np.rint(x * 4095 / 255).astype(np.uint16)}[kind]
    path = tmp_path / "breastmnist.npz"
    np.savez(path, **arrays)
    converted = open_dataset({"source": "medmnist", "path": str(path)})
    for i in range(0, len(reference.samples), 97):
        a = np.asarray(converted.load(converted.samples[i]), dtype=int)
        b = np.asarray(reference.load(reference.samples[i]), dtype=int)
        assert np.abs(a - b).max() <= 1, (kind, i)
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = arrays[f"{split}_images"].astype(np.float32) * 1000 - 5
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="train/val/test_images: float32 images range over"):
        open_dataset({"source": "medmnist", "path": str(path)})
    arrays["test_images"] = arrays["test_images"].astype(np.float64)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="different dtypes"):
        open_dataset({"source": "medmnist", "path": str(path)})


def test_npz_pixel_rule_is_shared_by_the_splits(tmp_path):
    """The same raw value is the same pixel in train and test, whatever each split's own range."""
    from calibprompt.data.medmnist import to_uint8

    images = {"train": np.full((4, 8, 8), 4095, np.uint16), "test": np.full((4, 8, 8), 1500, np.uint16)}
    images["train"][0, 0, 0] = 1500
    np.savez(tmp_path / "x.npz", train_images=images["train"], test_images=images["test"],
             train_labels=np.array([[0], [1], [0], [1]]), test_labels=np.array([[0], [1], [0], [1]]))
    ds = open_dataset({"source": "medmnist", "path": str(tmp_path / "x.npz"), "classnames": ["a", "b"]})
    assert ds.modes == {"train": "bits12", "test": "bits12"}
    assert to_uint8(images["train"][0], "bits12")[0, 0] == to_uint8(images["test"][0], "bits12")[0, 0] == 93


def test_too_few_images_for_the_shots_is_named(tmp_path, model):
    root = _tree(tmp_path / "d" / "train", {"a": 2, "b": 6})
    _tree(tmp_path / "d" / "test", {"a": 2, "b": 2})
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "d", shots=4)
    code = main(["train", str(cfg), "--out", str(tmp_path / "o")])
    assert code == 2 and root.is_dir()


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override,expected", [
    ("trian.epochs=3", "unknown config key 'trian'"),
    ("train.epochs=ten", "train.epochs: 'ten' is not an integer"),
    ("shots=2.5", "shots: 2.5 is not an integer"),
    ("train.epochs=2.5", "train.epochs: 2.5 is not an integer"),
    ("shots=-3", "shots: -3 is out of range"),
    ("eval.n_bins=0", "eval.n_bins: 0 is out of range"),
    ("prompt.position=middel", "prompt.position: 'middel' is not one of"),
    ("method={name: calibprompt, alpha: 1.5}", "alpha must be in [0, 1)"),
    ("method.name=coop-xx", "unknown method 'coop-xx'"),
    ("posthoc=foo", "posthoc 'foo' is not a post-hoc calibrator"),
    ("backbone.pth=/x", "unknown backbone key(s) ['pth']"),
])
def test_bad_config_values_fail_before_any_work(override, expected, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-model", tmp_path / "no-data")
    code = main(["train", str(cfg), "--out", str(tmp_path / "o"), "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") <= 3 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing was loaded or written


def test_custom_loss_list_is_checked_before_any_work(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-model", tmp_path / "no-data",
                       method={"name": "custom"}, losses=[{"name": "CE"}, {"name": "SMACK"}])
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown loss 'SMACK'" in capsys.readouterr().err


def test_a_runs_own_config_yaml_loads_again(tmp_path, model, images):
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", model, images)), "--out", str(out), "--quiet"]) == 0
    again = tmp_path / "again"
    assert main(["eval", str(out / "config.yaml"), "--head", str(out / "head.safetensors"), "--out", str(again),
                 "--quiet"]) == 0
    assert json.loads((again / "metrics.json").read_text())["status"] == "done"


# ------------------------------------------------------------------------------------- one-line errors
def _err(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_command_line_errors_are_one_line(tmp_path, model, images, capsys, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", model, images)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    assert main(["train", str(cfg), "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in _err(capsys)
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"backbones": {"t": {"path": str(model)}},
                                    "datasets": {"d": {"source": "folder", "path": str(images)}},
                                    "methods": ["zeroshot"], "seeds": [1]}))
    assert main(["sweep", str(grid), "--out", str(a_file)]) in (1, 2)
    assert str(a_file) in _err(capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: {name: coop-ce\nshots: [1, 2\n")
    assert main(["train", str(bad_yaml), "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml, line" in _err(capsys)
    bad_yaml.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["train", str(bad_yaml), "--out", str(tmp_path / "o")]) == 2
    assert "no !!python tags" in _err(capsys)
    assert main(["sweep", str(grid), "--out", str(tmp_path / "s"), "--store", "::::"]) == 2
    assert "is not a database URL" in _err(capsys)
    not_db = tmp_path / "results.db"
    not_db.write_text("this is not a database, just text " * 40)
    assert main(["sweep", str(grid), "--out", str(tmp_path / "s2"), "--store", f"sqlite:///{not_db}"]) == 2
    assert "cannot be opened as a database" in _err(capsys)
    out = tmp_path / "coop"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    prompt = out / "prompt.safetensors"
    prompt.write_bytes(prompt.read_bytes()[:40])
    assert main(["eval", str(out / "config.yaml"), "--prompt", str(prompt), "--out", str(tmp_path / "e")]) == 2
    assert "prompt.safetensors" in _err(capsys)


def test_full_or_read_only_disk_is_one_line_and_leaves_no_result(tmp_path, model, images, capsys, monkeypatch):
    import calibprompt.settings as settings

    real = settings.os.replace

    def failing(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real(src, dst)

    monkeypatch.setattr(settings.os, "replace", failing)
    out = tmp_path / "run"
    code = main(["train", str(write_config(tmp_path / "c.yaml", model, images)), "--out", str(out), "--quiet"])
    err = _err(capsys)
    assert code == 1 and "cannot write" in err and "metrics.json" in err and "Read-only" in err
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
