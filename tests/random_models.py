"""Architecture-exact, randomly initialised models written in real on-disk formats.

Test fixtures (not shipped with the package): used where no pretrained weights may be downloaded, in
tests, CI and the benchmark. The architecture comes
from a real config; only the weight values are random. A BERT text tower needs a tokenizer; where the
real vocabulary is unavailable (PubMedBERT), :func:`write_standin_wordpiece_vocab` writes a stand-in of
the right size — token ids are then not the real model's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from calibprompt.backbones.hf_clip import HFClipBackbone, clip_tokenizer
from calibprompt.backbones.loading import build_empty, random_fill_
from calibprompt.backbones.medclip import MedCLIPModel, MedClipBackbone, bert_tokenizer
from calibprompt.backbones.open_clip_model import OpenClipBackbone, _image_size, build_open_clip
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from calibprompt.settings import atomic_write_json, atomic_write_text

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_standin_wordpiece_vocab(path: str | Path, size: int = 30522,
                                  words: tuple[str, ...] = ()) -> Path:
    """A stand-in WordPiece vocabulary (NOT PubMedBERT's) of exactly ``size`` entries: [PAD] at id 0,
    special tokens, letters, digits, punctuation, the given ``words``, then filler sub-words."""
    base = SPECIAL_TOKENS + list("abcdefghijklmnopqrstuvwxyz0123456789.,;:-_'()&/!?")
    base += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    base += [w for w in words if w not in base]
    entries = list(dict.fromkeys(base))
    i = 0
    while len(entries) < size:
        entries.append(f"[unused{i}]")
        i += 1
    path = Path(path)
    atomic_write_text(path, "\n".join(entries[:size]) + "\n")
    return path


def write_bert_text_dir(folder: str | Path, bert_config: dict | str | Path,
                        vocab: str | Path | None = None, words: tuple[str, ...] = ()) -> Path:
    """A local BERT folder (config.json, vocab.txt, tokenizer_config.json) that open_clip's HF text
    tower and tokenizer read offline. ``vocab=None`` writes a stand-in vocabulary of the config's size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(bert_config, dict):
        bert_config = json.loads(Path(bert_config).read_text())
    config = {"model_type": "bert", "architectures": ["BertModel"], **bert_config}
    atomic_write_json(folder / "config.json", config)
    if vocab is None:
        write_standin_wordpiece_vocab(folder / "vocab.txt", int(config.get("vocab_size", 30522)), words)
    else:
        shutil.copyfile(vocab, folder / "vocab.txt")
    atomic_write_json(folder / "tokenizer_config.json", {
        "do_lower_case": True, "tokenizer_class": "BertTokenizer",
        "model_max_length": int(config.get("max_position_embeddings", 512)),
    })
    return folder


def write_random_open_clip(folder: str | Path, model_cfg: dict, preprocess_cfg: dict | None = None,
                           text_dir: str | Path | None = None, seed: int = 0,
                           logit_scale: float | None = None) -> Path:
    """Build ``model_cfg`` with random weights (seeded) and save it in open_clip's hub format.
    For a BERT text tower, ``hf_model_name``/``hf_tokenizer_name`` in the saved config point at
    ``text_dir`` so the folder loads offline. ``logit_scale`` sets exp(s) (e.g. 100)."""

    cfg = json.loads(json.dumps(model_cfg))
    if cfg.get("text_cfg", {}).get("hf_model_name") and text_dir is not None:
        cfg["text_cfg"]["hf_model_name"] = str(text_dir)
        cfg["text_cfg"]["hf_tokenizer_name"] = str(text_dir)
        cfg["text_cfg"]["hf_model_pretrained"] = False
    torch.manual_seed(seed)
    model = build_open_clip(cfg)
    if logit_scale is not None:
        model.logit_scale.data.fill_(float(torch.tensor(logit_scale).log()))
    pre = preprocess_cfg or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    preprocess = Preprocess(image_size=int(size), mean=tuple(pre.get("mean", CLIP_MEAN)),
                            std=tuple(pre.get("std", CLIP_STD)))
    backbone = OpenClipBackbone(model, cfg, preprocess, name=Path(folder).name)
    return backbone.save_dir(folder)


def random_open_clip_backbone(model_cfg: dict, name: str, text_dir: str | Path | None = None, seed: int = 0,
                              logit_scale: float = 100.0, preprocess_cfg: dict | None = None) -> OpenClipBackbone:
    """An architecture-exact open_clip model with fast seeded random weights (tests, CI, benchmarks).

    ``model_cfg`` is kept as given (e.g. BiomedCLIP's hub names), so :meth:`OpenClipBackbone.save_dir`
    writes the real config; ``text_dir`` only supplies the BERT config and tokenizer while building."""
    model = random_fill_(build_open_clip(model_cfg, None if text_dir is None else str(text_dir), empty=True), seed)
    model.logit_scale.data.fill_(math.log(logit_scale))
    pre = preprocess_cfg or {}
    preprocess = Preprocess(image_size=_image_size(model_cfg), mean=tuple(pre.get("mean", CLIP_MEAN)),
                            std=tuple(pre.get("std", CLIP_STD)))
    return OpenClipBackbone(model, model_cfg, preprocess, name=name,
                            text_dir=None if text_dir is None else str(text_dir), source="random")


def write_random_hf_clip(folder: str | Path, config_path: str | Path, tokenizer_dir: str | Path,
                         seed: int = 0, weights_name: str = "model.safetensors") -> Path:
    """An architecture-exact, randomly initialised ``CLIPModel`` from a real ``config.json``, saved in
    the hub format with the given tokenizer files (tests, CI, benchmarks)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig.from_dict(json.loads(Path(config_path).read_text()))
    model = random_fill_(build_empty(lambda: CLIPModel(config)), seed=seed)
    model.logit_scale.data.fill_(float(config.logit_scale_init_value))
    tokenizer = clip_tokenizer(tokenizer_dir, int(config.text_config.max_position_embeddings))
    backbone = HFClipBackbone(model.eval(), tokenizer, Preprocess(), name=Path(folder).name)
    return backbone.save_dir(folder, weights_name=weights_name, config_path=config_path, tokenizer_dir=tokenizer_dir)


def write_random_medclip(path: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """An architecture-exact, randomly initialised MedCLIP-ViT saved as the published
    ``pytorch_model.bin`` (key names and extra buffers included). Tests, CI and benchmarks only."""
    model = random_fill_(build_empty(MedCLIPModel), seed=seed)
    model.logit_scale.data.fill_(math.log(1 / 0.07))
    return MedClipBackbone(model.eval(), bert_tokenizer(tokenizer_dir)).save_published(path)
