"""Tiny randomly initialised open_clip models of both text families, and small image folders, for
end-to-end tests. Architectures are real open_clip ones, only small."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.random_models import write_bert_text_dir, write_random_open_clip

VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": VISION,
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TINY_BERT = {"embed_dim": 32, "vision_cfg": VISION,
             "text_cfg": {"hf_model_name": "-", "hf_tokenizer_name": "-", "hf_proj_type": "mlp",
                          "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}}
BERT_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
               "vocab_size": 2000, "max_position_embeddings": 512, "pad_token_id": 0}
WORDS = ("x", "tumor", "normal", "image", "an", "of", "benign", "malignant", "lung", "opacity")


def tiny_model_dir(root: Path, family: str, logit_scale: float = 100.0) -> Path:
    """Write a tiny model folder of ``family`` ("clip" or "bert") under ``root`` and return it.
    The BERT one uses a stand-in WordPiece vocabulary (not PubMedBERT)."""
    root = Path(root)
    if family == "clip":
        return write_random_open_clip(root / "tiny-clip", TINY_CLIP, logit_scale=logit_scale)
    text_dir = write_bert_text_dir(root / "tiny-bert-text", BERT_CONFIG, words=WORDS)
    return write_random_open_clip(root / "tiny-bert", TINY_BERT, text_dir=text_dir, logit_scale=logit_scale)


def write_image_folder(root: Path, classes=("normal", "tumor"), n_train: int = 10, n_test: int = 6,
                       size: int = 40, seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png`` with class-dependent brightness, so classes are learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = 60 + 120 * k
                pixels = np.clip(rng.normal(base, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


def pretrain_tiny_micro(folder: Path, steps: int = 20) -> Path:
    """A micro model (width 32, one layer per tower) pretrained for ``steps`` steps on PneumoniaMNIST:
    20 steps (seconds) when its quality does not matter, 300 (~10 s, ~83% zero-shot val accuracy) when it
    must be a usable classifier."""
    from calibprompt.pretrain import PretrainSettings, pretrain_micro, task_text
    from tests.conftest import require_shared

    path = require_shared("medmnist/pneumoniamnist.npz")
    cfg = {"source": "medmnist", "path": str(path), "name": "pneumoniamnist",
           "template": task_text("pneumoniamnist").zero_shot}
    settings = PretrainSettings(steps=steps, batch_size=32, width=32, vision_layers=1, text_layers=1,
                                captions_per_group=4, eval_every=steps, threads=1)
    pretrain_micro([cfg], folder, settings, progress=False, log=lambda m: None)
    return folder
