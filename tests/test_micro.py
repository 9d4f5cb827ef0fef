"""The micro Med-VLM: captions, which images pretraining may see, finding MedMNIST files, and a reduced
pretraining run on the real PneumoniaMNIST file followed by prompt tuning (the demo's claims in
miniature: zero-shot above chance, CE prompt tuning overconfident, temperature scaling lowers its NLL)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from calibprompt.pretrain import (
    META_FILE,
    PretrainSettings,
    class_captions,
    downstream_pool,
    find_medmnist,
    pretrain_micro,
    pretrain_samples,
    read_meta,
    task_text,
)
from tests.conftest import require_shared

# Seconds, not minutes: a narrow model (width 64, 2+2 layers) and 150 steps of 64 images.
TINY = dict(steps=150, batch_size=64, lr=2e-3, width=64, vision_layers=2, text_layers=2, captions_per_group=8,
            eval_every=150, threads=1)


def _pneumonia_cfg():
    path = require_shared("medmnist/pneumoniamnist.npz")
    return {"source": "medmnist", "path": str(path), "name": "pneumoniamnist",
            "template": task_text("pneumoniamnist").zero_shot}


@pytest.fixture(scope="module")
def tiny_micro(tmp_path_factory):
    """A micro model pretrained for a few seconds on the PneumoniaMNIST train split (test unused)."""
    cfg = _pneumonia_cfg()
    folder = tmp_path_factory.mktemp("micro") / "micro-tiny"
    meta = pretrain_micro([cfg], folder, PretrainSettings(**TINY), progress=False, log=lambda m: None)
    return folder, meta, cfg


def test_captions_are_paraphrases_that_fit_the_context():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=32)
    for flag, classes in (("pneumoniamnist", ["normal", "pneumonia"]), ("breastmnist", ["malignant", "normal, benign"])):
        text = task_text(flag)
        for name in classes:
            captions = class_captions(text, name)
            assert 40 <= len(captions) <= 70, (flag, name, len(captions))
            assert len(set(captions)) == len(captions)
            assert text.zero_shot.format(name).lower() in captions  # zero-shot prompt is a caption
            assert bool((tokenizer(captions)[:, -1] == 0).all())  # nothing truncated
            coop = " ".join(["X"] * 16) + f" {name}."
            assert int(tokenizer([coop])[0].argmax()) < 31  # the CoOp prompt fits too
    other = task_text("bloodmnist")
    assert "blood cell" in other.zero_shot and len(class_captions(other, "basophil")) >= 20


def test_pretraining_never_sees_test_or_reserved_images():
    from calibprompt.data import open_dataset

    path = require_shared("medmnist/breastmnist.npz")
    ds = open_dataset({"source": "medmnist", "path": str(path)})
    pool, pre = downstream_pool(ds), pretrain_samples(ds)
    assert {s.split for s in pool} == {"train"} and {s.split for s in pre} == {"train"}
    assert not {s.ref for s in pool} & {s.ref for s in pre}
    counts = np.bincount([s.label for s in pool], minlength=2)
    assert counts.tolist() == [147 // 4, 64]  # a quarter, at most 64: 147 malignant, 399 benign
    assert len(pool) + len(pre) <= 546
    test_hashes = {ds.content_hash(s) for s in ds.samples_in("test")}
    assert not test_hashes & {ds.content_hash(s) for s in pre}
    assert downstream_pool(ds) == pool  # deterministic


def test_missing_medmnist_file_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIBPROMPT_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        find_medmnist("breastmnist", download=False)
    message = str(err.value)
    assert "breastmnist.npz" in message and "CALIBPROMPT_DATA" in message and "zenodo" in message.lower()


def test_found_through_the_data_setting(monkeypatch):
    path = require_shared("medmnist/breastmnist.npz")
    monkeypatch.setenv("CALIBPROMPT_DATA", str(path.parent.parent))
    assert find_medmnist("breastmnist", download=False) == path


def test_saved_in_open_clip_format_and_loads_through_the_backbone_path(tiny_micro):
    from calibprompt.backbones import load_backbone

    folder, meta, _ = tiny_micro
    assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()
    saved = json.loads((folder / META_FILE).read_text())
    assert saved["sources"][0]["test_images_used"] == 0 and read_meta(folder)["weights_sha256"]
    assert 4708 - 2 * 64 - 10 <= saved["sources"][0]["pretrain_images"] <= 4708 - 2 * 64  # minus the reserved pool
    backbone = load_backbone({"path": str(folder)})
    assert abs(float(backbone.logit_scale) - 100.0) < 1e-3  # fixed at 100 (ramped only while training)
    assert backbone.info.family == "clip" and backbone.info.context_length == 32


def test_reduced_pretraining_then_prompt_tuning(tiny_micro, tmp_path):
    """Zero-shot above chance; CE prompt tuning measurably overconfident; TS on validation lowers its NLL."""
    from calibprompt.config import load_config
    from calibprompt.data import open_dataset
    from calibprompt.demo import write_splits
    from calibprompt.features import FeatureCache
    from calibprompt.engine.run import run

    folder, _, data = tiny_micro
    ds = open_dataset(data)
    split = write_splits(ds, [1], shots=8, val_shots=32, folder=tmp_path / "splits")[1]
    cache = FeatureCache(tmp_path / "features")
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny text encoder: one thread, as the demo does
    try:
        for method in ("zeroshot", "coop-ce", "coop-ce+ts"):
            cfg = load_config(None, base={
                "backbone": {"path": str(folder)}, "data": data, "method": {"name": method},
                "split_file": str(split), "shots": 8, "val_shots": 32, "seed": 1,
                "train": {"epochs": 200, "optimizer": "adam", "lr": 0.002, "augment": False},  # as the demo
            })
            # +ts evaluates the CE prompts with a temperature fitted on the validation shots
            ctx = tmp_path / "coop-ce" / "prompt.safetensors" if method == "coop-ce+ts" else None
            results[method] = run(cfg, tmp_path / method, quiet=True, cache=cache, head_from=ctx)["metrics"]
    finally:
        torch.set_num_threads(threads)
    zs, ce, ts = results["zeroshot"], results["coop-ce"], results["coop-ce+ts"]
    assert zs["accuracy"] > 0.5 + 0.1, zs  # K = 2: chance is 0.5 (the majority class is 0.625)
    assert zs["macro_f1"] > 0.5, zs
    assert ce["confidence"] - ce["accuracy"] > 0.03 and ce["ece"] > 0.03, ce  # overconfident
    assert ts["nll"] < ce["nll"], (ts, ce)
    assert ts["accuracy"] == ce["accuracy"]  # temperature scaling keeps every prediction
