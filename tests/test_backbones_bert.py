"""BERT-family open_clip backbones: BiomedCLIP and UniMed-CLIP.

Stand-in vocabulary, not PubMedBERT: the real PubMedBERT vocab.txt is unavailable, so the text tower
uses a generated WordPiece vocabulary of the right size (30,522 entries). Shapes and the architecture
are exact (real BiomedCLIP open_clip config, real PubMedBERT BERT config); token ids are not
PubMedBERT's.

BiomedCLIP is written as its hub folder (the real open_clip_config.json, whose text names point at the
hub, plus open_clip_pytorch_model.bin and the tokenizer files); UniMed-CLIP as the authors' training
checkpoint (``state_dict`` with ``module.`` prefixes, BiomedBERT under ``text_encoder.``)."""

from __future__ import annotations

import json

import pytest
import torch

from calibprompt.backbones import WeightsError
from calibprompt.backbones.open_clip_model import OpenClipBackbone
from tests.random_models import random_open_clip_backbone
from calibprompt.backbones.openai_format import UNIMED_TEXT_CFG, unimed_state_dict
from tests.random_models import write_bert_text_dir
from calibprompt.backbones import load_backbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.conftest import require_shared
from tests.test_backbones import (  # noqa: F401 - hub_offline is an autouse fixture
    assert_zero_shot_equals_open_clip, hub_offline, injection_errors, n_params,
)

CLASSES = ["normal", "lung opacity"]
PHRASE = "a photo of a"
WORDS = ("photo", "of", "normal", "lung", "opacity", "chest", "ray", "image", "patient", "the")
BIOMEDCLIP_PARAMS = 195_902_721  # 195.9 M (timm ViT-B/16 85.8 M + head, BERT-base without pooler, MLP head)
UNIMED_B16_PARAMS = 195_903_489  # open_clip ViT-B/16 86.2 M + the same text tower


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    text_dir = write_bert_text_dir(root / "BiomedBERT", require_shared("configs/pubmedbert/config.json"), words=WORDS)
    config = json.loads(require_shared("configs/biomedclip/open_clip_config.json").read_text())
    biomed = random_open_clip_backbone(config["model_cfg"], "biomedclip", text_dir=text_dir, seed=4,
                                       preprocess_cfg=config["preprocess_cfg"])
    folder = biomed.save_dir(root / "BiomedCLIP", weights_name="open_clip_pytorch_model.bin")
    biomed.copy_tokenizer_files(folder, text_dir)  # a hub snapshot holds them next to the weights
    del biomed
    vit_b16 = json.loads(require_shared("configs/open_clip/ViT-B-16-quickgelu.json").read_text())
    unimed_cfg = {"embed_dim": 512, "quick_gelu": True, "vision_cfg": vit_b16["vision_cfg"],
                  "text_cfg": UNIMED_TEXT_CFG}
    unimed = random_open_clip_backbone(unimed_cfg, "unimed", text_dir=text_dir, seed=5)
    checkpoint = root / "unimed_clip_vit_b16.pt"
    state = {f"module.{k}": v for k, v in unimed_state_dict(unimed).items()}  # a training checkpoint
    torch.save({"epoch": 10, "state_dict": state}, checkpoint)
    return {"text_dir": text_dir, "biomedclip": folder, "unimedclip-b16": checkpoint}


_loaded: dict = {}


@pytest.fixture(scope="module")
def loaded(files):
    def get(name: str, **extra):
        key = (name, tuple(sorted(extra.items())))
        if key not in _loaded:
            cfg = {"name": name, "path": str(files[name]), **extra}
            if name == "unimedclip-b16":  # a single checkpoint: its BERT config and tokenizer live apart
                cfg.setdefault("text_dir", str(files["text_dir"]))
            _loaded[key] = load_backbone(cfg)
        return _loaded[key]
    yield get
    _loaded.clear()


def test_biomedclip_architecture_offline_from_its_hub_folder(loaded, files):
    """No text_dir: the BERT config ships with calibprompt and the tokenizer comes from the folder."""
    bb = loaded("biomedclip")
    info = bb.info
    assert (info.family, info.embed_dim, info.token_dim, info.context_length) == ("bert", 512, 768, 256)
    assert n_params(bb.model) == BIOMEDCLIP_PARAMS
    shapes = {k: tuple(v.shape) for k, v in bb.model.state_dict().items()}
    assert shapes["text.transformer.embeddings.word_embeddings.weight"] == (30522, 768)
    assert shapes["text.proj.0.weight"] == (640, 768) and shapes["text.proj.2.weight"] == (512, 640)
    assert "text.proj.0.bias" not in shapes and "text.transformer.pooler.dense.weight" not in shapes
    assert shapes["visual.trunk.patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["visual.head.proj.weight"] == (512, 768)
    assert info.extra["format"] == "open_clip" and info.extra["double_embedding"] is False
    assert info.extra["parity"] == "standard" and info.extra["precision"] == "fp32"


@pytest.mark.parametrize("name", ["biomedclip", "unimedclip-b16"])
def test_zero_shot_logits_equal_open_clip(loaded, name):
    bb = loaded(name)
    ids = bb.tokenize([f"A chest X-ray image of {c} patient" for c in CLASSES])
    assert ids.shape == (2, 256)
    assert_zero_shot_equals_open_clip(bb, ids)


@pytest.mark.parametrize("name", ["biomedclip", "unimedclip-b16"])
def test_context_injection_equals_written_prompt(loaded, name):
    positions = ("end", "front", "middle") if name == "biomedclip" else ("end",)
    errors = injection_errors(loaded(name), CLASSES, PHRASE, positions)
    assert max(errors.values()) < 1e-5, errors


def test_trimming_padding_is_exact(loaded):
    bb = loaded("biomedclip")
    ids = bb.tokenize([f"X X X X {c}." for c in CLASSES])
    with torch.no_grad():
        full, trimmed = bb.encode_text(ids), bb.encode_text(bb.trim(ids))
    assert bb.trim(ids).shape[1] < 20
    assert (full - trimmed).abs().max() < 1e-5


def test_double_embedding_is_bert_embedding_applied_twice(loaded, files):
    """Q1 parity (documented form: text_dir given): fixed tokens get BERT's full embedding module, then
    BERT embeds the result again; ctx vectors are embedded once."""
    std = loaded("biomedclip")
    ref = loaded("biomedclip", parity="reference", text_dir=str(files["text_dir"]))
    assert ref.info.extra["double_embedding"] is True and ref.info.extra["parity"] == "reference"
    phrase_ids = std.tokenize([PHRASE])[:, 1:5]
    with torch.no_grad():
        ctx = std.embed_tokens(phrase_ids)[0]  # word embeddings of the written phrase
        learner = PromptLearner(ref, CLASSES, n_ctx=4)
        doubled = learner.text_features(ref, ctx=ctx)
        plain = PromptLearner(std, CLASSES, n_ctx=4).text_features(std, ctx=ctx)
        # By hand: full embedding module on the fixed tokens, word embeddings at the ctx positions,
        # then BERT (which adds positions, token types and LayerNorm once more), CLS, MLP head.
        text = ref.model.text
        ids = learner.ids
        emb = text.transformer.embeddings(input_ids=ids)
        emb[:, 1:5] = ctx
        mask = (ids != 0).long()
        out = text.transformer(inputs_embeds=emb, attention_mask=mask)
        manual = torch.nn.functional.normalize(text.proj(out.last_hidden_state[:, 0]), dim=-1)
    assert (doubled - manual).abs().max() < 1e-5
    assert (doubled - plain).abs().max() > 1e-3  # the quirk really changes the features


def test_unimed_checkpoint_maps_onto_open_clip(loaded):
    bb = loaded("unimedclip-b16")
    info = bb.info
    assert (info.family, info.token_dim, info.context_length) == ("bert", 768, 256)
    assert info.extra["format"] == "unimed" and info.extra["quick_gelu"] is True
    assert n_params(bb.model) == UNIMED_B16_PARAMS
    shapes = {k: tuple(v.shape) for k, v in bb.model.state_dict().items()}
    assert shapes["visual.conv1.weight"] == (768, 3, 16, 16) and shapes["visual.proj"] == (768, 512)
    assert shapes["text.proj.2.weight"] == (512, 640)


def test_unimed_needs_its_text_tower_offline(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="backbone.text_dir"):
        load_backbone({"name": "unimedclip-b16", "path": str(files["unimedclip-b16"])})


def test_strict_loading_lists_missing_and_unexpected_keys(loaded, files):
    bb = loaded("biomedclip")
    state = {k: v for k, v in bb.model.state_dict().items() if k != "text.proj.2.weight"}
    state["text.proj.3.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        OpenClipBackbone.from_state_dict(bb.model_cfg, state, source="truncated.bin", name="biomedclip",
                                         text_dir=str(files["text_dir"]))
    message = str(info.value)
    assert "missing keys: text.proj.2.weight" in message and "unexpected keys: text.proj.3.weight" in message


def test_text_dir_problems_name_the_key(tmp_path, files, monkeypatch):
    with pytest.raises(WeightsError, match="backbone.text_dir .* lacks config.json, vocab.txt"):
        load_backbone({"name": "biomedclip", "path": str(files["biomedclip"]), "text_dir": str(tmp_path)})
    bare = tmp_path / "bare"
    bare.mkdir()
    config = require_shared("configs/biomedclip/open_clip_config.json")
    (bare / "open_clip_config.json").write_bytes(config.read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="hub is offline.*backbone.text_dir"):
        load_backbone({"name": "biomedclip", "path": str(bare)})
