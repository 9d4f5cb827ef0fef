"""The benchmark's model (architecture-exact BiomedCLIP, random weights) and synthetic PNG dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.engine_bench.harness import CLASSES, VOCAB_WORDS

def build_biomedclip(workdir: Path):
    """Architecture-exact BiomedCLIP (ViT-B/16 + PubMedBERT, CLS pooling, MLP projection), random
    weights, stand-in 30,522-entry WordPiece vocabulary (NOT PubMedBERT's), built in memory."""
    from calibprompt.backbones.open_clip_model import OpenClipBackbone, build_open_clip
    from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
    from tests.random_models import write_bert_text_dir
    from calibprompt.settings import shared_file

    clip_cfg = json.loads(shared_file("configs/biomedclip/open_clip_config.json").read_text())
    bert_cfg = shared_file("configs/pubmedbert/config.json")
    text_dir = write_bert_text_dir(workdir / "pubmedbert-standin", bert_cfg, words=VOCAB_WORDS)
    model_cfg = clip_cfg["model_cfg"]
    torch.manual_seed(0)
    model = build_open_clip(model_cfg, str(text_dir))
    pre = clip_cfg.get("preprocess_cfg", {})
    preprocess = Preprocess(image_size=int(model_cfg["vision_cfg"].get("image_size", 224)),
                            mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)))
    return OpenClipBackbone(model, model_cfg, preprocess, "biomedclip-arch-random", text_dir=str(text_dir))


def embed_on_model_device(backbone) -> None:
    """``PromptLearner`` embeds the token ids it tokenised (on the CPU) with the backbone's embedding
    table; on an accelerator the ids must move to the table's device first. Done here for the
    benchmark (harmless where the backbone already does it)."""
    device = next(backbone.parameters()).device
    if device.type == "cpu":
        return
    original = type(backbone).embed_tokens.__get__(backbone)
    backbone.embed_tokens = lambda ids: original(ids.to(device))


def load_model_dir(model_dir: str, text_dir: str | None):
    from calibprompt.backbones.open_clip_model import OpenClipBackbone

    return OpenClipBackbone.from_dir(model_dir, text_dir=text_dir, allow_random=True)


def write_synthetic_images(root: Path, n_train_per_class: int, n_test: int, size: int = 224,
                           seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png``: smooth RGB images with class-dependent structure and noise
    (X-ray-like content, so PNG decoding costs what it costs for real images of this size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    from PIL import Image

    counts = {"train": [n_train_per_class] * len(CLASSES),
              "test": [n_test // len(CLASSES) + (1 if k < n_test % len(CLASSES) else 0) for k in range(len(CLASSES))]}
    for split, per_class in counts.items():
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[k]):
                cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
                blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
                base = 0.35 + 0.3 * yy + (0.25 if k == 0 else -0.1) * blob
                img = np.clip(base[..., None] * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}_{i:04d}.png")
    return root


def open_bench_dataset(root: Path):
    from calibprompt.data import open_dataset

    return open_dataset({"source": "folder", "path": str(root), "name": "synthetic-covid"})
