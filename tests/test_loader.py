"""The input pipeline beside the encoder (features.loader): identical features whatever builds the
batches, errors raised as they are, the auto rule, the seeded augmentation, and cold start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.backbones.preprocess import Preprocess
from calibprompt.config import ConfigError, config_hash, load_config, resolve
from calibprompt.data import DataError, open_dataset
from calibprompt.features import FeatureCache
from calibprompt.features.loader import BatchBuilder, Item, auto_workers, pixel_batches
from tests.random_models import random_open_clip_backbone
from tests.tiny_models import TINY_CLIP


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return random_open_clip_backbone(TINY_CLIP, "tiny-clip").eval()


@pytest.fixture()
def folder(tmp_path):
    """23 PNGs of mixed sizes and modes in two class folders (23 = two full batches of 8, one of 7)."""
    rng = np.random.default_rng(0)
    for i in range(23):
        cls = tmp_path / "images" / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        side = (20 + 7 * i, 40 + 3 * i)
        shape = (side[1], side[0]) if i % 3 else (side[1], side[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(cls / f"{i:02d}.png")
    return tmp_path / "images"


SETTINGS = [(0, "process"), (2, "process"), (1, "thread"), (2, "thread"), ("auto", "process")]


def _views(cache, backbone, dataset, samples, n_views=3):
    evals, views = cache.run_features(backbone, dataset, [samples], train=samples, n_views=n_views, aug_seed=5,
                                      batch_size=8)
    return evals[0], views


@pytest.mark.parametrize("workers,kind", SETTINGS)
def test_features_are_bit_identical_whatever_builds_the_batches(backbone, folder, tmp_path, workers, kind):
    dataset = open_dataset({"source": "folder", "path": str(folder)})
    samples = dataset.samples
    serial = _views(FeatureCache(tmp_path / "serial", workers=0), backbone, dataset, samples)
    other = _views(FeatureCache(tmp_path / f"w{workers}{kind}", workers=workers, loader_kind=kind), backbone,
                   dataset, samples)
    assert torch.equal(serial[0], other[0]) and torch.equal(serial[1], other[1])
    assert serial[1].shape == (23, 3, 32) and not torch.equal(serial[1][:, 0], serial[1][:, 1])  # views differ


def test_a_feature_does_not_depend_on_its_batch_mates(backbone, folder, tmp_path):
    dataset = open_dataset({"source": "folder", "path": str(folder)})
    samples = dataset.samples
    alone = FeatureCache(tmp_path / "one", workers=2).features(backbone, dataset, samples[5:6], batch_size=8)
    within = FeatureCache(tmp_path / "all", workers=2).features(backbone, dataset, samples, batch_size=8)
    assert torch.equal(alone[0], within[5])


@pytest.mark.parametrize("workers,kind", [(0, "process"), (2, "process"), (2, "thread")])
def test_a_corrupt_image_raises_the_data_error_itself(backbone, folder, tmp_path, workers, kind):
    dataset = open_dataset({"source": "folder", "path": str(folder)})
    bad = dataset.samples[17]
    Path(folder, bad.ref).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=f"cannot read image '{bad.ref}'.*not a recognised image"):
        FeatureCache(tmp_path / "c", workers=workers, loader_kind=kind).features(backbone, dataset, dataset.samples,
                                                                                 batch_size=8)


def test_batches_are_padded_cast_and_in_order(folder):
    dataset = open_dataset({"source": "folder", "path": str(folder)})
    pre = Preprocess(image_size=16)
    chunks = [[Item(s, False, None) for s in dataset.samples[i : i + 8]] for i in range(0, 23, 8)]
    builder = BatchBuilder(dataset, pre, chunks, 8, dtype=torch.float16)
    out = list(pixel_batches(builder, 2, "thread"))
    assert [b.shape for b in out] == [(8, 3, 16, 16)] * 3 and out[0].dtype == torch.float16
    assert torch.equal(out[2][7], torch.zeros(3, 16, 16, dtype=torch.float16))  # the padding row
    assert torch.equal(out[1][0], pre.apply(dataset.load(dataset.samples[8])).half())


def test_auto_rule():
    assert auto_workers(2, "cpu", build_s=10.0, encode_s=10.0) == 0  # too few batches to pay for workers
    assert auto_workers(50, "cpu", build_s=0.005, encode_s=0.01) == 0  # micro model: a batch encodes in 10 ms
    assert auto_workers(50, "cpu", build_s=0.001, encode_s=2.0) == 0  # building is under 5% of encoding
    assert auto_workers(50, "cpu", build_s=0.2, encode_s=2.0) >= 1  # ViT-B/32 on a CPU
    assert auto_workers(50, "cuda", build_s=0.2, encode_s=0.01) >= 1  # a GPU waits for the CPU otherwise
    with pytest.raises(ValueError, match="workers must be"):
        FeatureCache(None, workers=-1)
    with pytest.raises(ValueError, match="loader kind"):
        FeatureCache(None, loader_kind="greenlet")


def test_encode_config_is_checked_and_not_part_of_the_run_identity(tmp_path):
    base = {"backbone": {"name": "micro-medmnist"}, "data": {"source": "folder", "path": str(tmp_path)}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(base))
    assert load_config(path)["encode"] == {"workers": "auto", "batch_size": 32, "amp": "none"}
    assert config_hash(load_config(path, ["encode.workers=0"])) == config_hash(load_config(path, ["encode.workers=3"]))
    assert resolve(load_config(path, ["encode.workers=2"]))["encode"]["workers"] == 2
    for bad in ("encode.workers=-1", "encode.workers=many", "encode.workers=1.5", "encode.batch_size=0", "encode.amp=fp8",
                "encode.loader=fast"):
        with pytest.raises(ConfigError, match="encode"):
            resolve(load_config(path, [bad]))


@pytest.mark.parametrize("size,pre", [
    ((28, 28), Preprocess(image_size=28)),
    ((300, 200), Preprocess()),
    ((50, 400), Preprocess(image_size=64, crop_scale=(0.9, 1.0))),  # every try misses: the centre-crop fallback
    ((64, 64), Preprocess(image_size=32, grey=True, mean=(0.5,), std=(0.25,))),
])
def test_seeded_view_equals_torchvision_under_the_global_seed(size, pre):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = pre.transform(True)
    state = torch.random.get_rng_state()
    for seed in range(60):
        torch.manual_seed(seed)
        expected = reference(image)
        assert torch.equal(pre.apply(image, True, seed), expected), seed
    torch.random.set_rng_state(state)
    with pytest.raises(ValueError, match="seed"):
        pre.apply(image, True)


def test_light_commands_do_not_import_model_libraries():
    probe = ("import contextlib, io, sys\nfrom calibprompt.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()):\n    main(['methods'])\n"
             "print(sorted(m for m in ('torchvision', 'open_clip', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0] == "[]"
    version = subprocess.run([sys.executable, "-c", "import sys\nfrom calibprompt.cli import main\ntry:\n    "
                              "main(['--version'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"],
                             check=True, capture_output=True, text=True).stdout.split()
    assert version[0] == "calibprompt" and version[-1] == "False"  # --version does not import torch


def test_encode_benchmark_runs_every_setting_and_checks_bit_identity(backbone, folder):
    """Smoke test of benchmarks/bench_encode.py on the tiny model (timings are printed, not asserted)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_encode.py"
    spec = importlib.util.spec_from_file_location("bench_encode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.bench_model("tiny", backbone, folder, (8, 16), 1, lambda _text: None)
    assert "not_bit_identical" not in result
    labels = {bench.label_of(w, k) for w, k in bench.SETTINGS}
    assert set(result["end_to_end"]["8"]) == labels and set(result["end_to_end"]["16"]) == labels
    assert result["best"]["serial"] == result["end_to_end"]["8"]["serial (before issue 23)"]
    assert result["best"]["end_to_end_over_serial"] >= 1.0 and result["best"]["end_to_end_over_encoder"] > 0
