"""transformers CLIPModel backbones (PLIP, PubMedCLIP, CLIP ViT-B/32) built from PLIP's real config.

One random ViT-B/32 CLIPModel is written once in the hub format (config.json + weights + the real CLIP
BPE tokenizer files, including the tokenizer_config.json with stale absolute paths) and loaded through
`load_backbone` under each registry name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from calibprompt.backbones import WeightsError
from calibprompt.backbones import load_backbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.conftest import require_shared
from tests.test_backbones import (  # noqa: F401 - hub_offline is an autouse fixture
    hub_offline, injection_errors, n_params, probe_images, zero_shot_logits,
)

CLASSES = ["adipose tissue", "colorectal adenocarcinoma epithelium"]
PHRASE = "a photo of a"
VIT_B32_PARAMS = 151_277_313  # OpenAI CLIP ViT-B/32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """plip: model.safetensors, legacy eos_token_id 2 (the real file). pubmedclip: pytorch_model.bin,
    with the config's eos_token_id set to 49407 so the 'first eos' pooling rule is exercised too."""
    from tests.random_models import write_random_hf_clip
    from calibprompt.backbones.weights import read_state_dict

    config = require_shared("configs/plip/config.json")
    tokenizer = require_shared("configs/clip_tokenizer/vocab.json").parent
    root = tmp_path_factory.mktemp("hf")
    plip = write_random_hf_clip(root / "plip", config, tokenizer, seed=1)
    pubmed = root / "pubmedclip"
    pubmed.mkdir()
    for f in plip.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, pubmed / f.name)
    cfg = json.loads(config.read_text())
    cfg["text_config"]["eos_token_id"] = 49407
    (pubmed / "config.json").write_text(json.dumps(cfg))
    torch.save(read_state_dict(plip / "model.safetensors"), pubmed / "pytorch_model.bin")
    return {"plip": plip, "clip-vit-b32": plip, "pubmedclip": pubmed}


_loaded: dict = {}


@pytest.fixture(scope="module")
def loaded(folders):
    def get(name: str, **extra):
        key = (name, tuple(sorted(extra.items())))
        if key not in _loaded:
            _loaded[key] = load_backbone({"name": name, "path": str(folders[name]), **extra})
        return _loaded[key]
    yield get
    _loaded.clear()


@pytest.mark.parametrize("name", ["plip", "pubmedclip", "clip-vit-b32"])
def test_architecture_and_recorded_switches(loaded, name):
    bb = loaded(name)
    info = bb.info
    assert (info.family, info.embed_dim, info.token_dim, info.context_length) == ("clip", 512, 512, 77)
    assert n_params(bb.model) == VIT_B32_PARAMS
    shapes = {k: tuple(v.shape) for k, v in bb.model.state_dict().items()}
    assert shapes["text_model.embeddings.token_embedding.weight"] == (49408, 512)
    assert shapes["text_model.embeddings.position_embedding.weight"] == (77, 512)
    assert shapes["vision_model.embeddings.patch_embedding.weight"] == (768, 3, 32, 32)
    assert shapes["visual_projection.weight"] == (512, 768) and shapes["text_projection.weight"] == (512, 512)
    extra = info.extra
    assert extra["format"] == "transformers" and extra["parity"] == "standard" and extra["precision"] == "fp32"
    assert extra["registry"] == name and extra["random_weights"] is False
    assert extra["pooling"] == ("first_eos" if name == "pubmedclip" else "argmax")
    assert bb.dtype == torch.float32


@pytest.mark.parametrize("name", ["plip", "pubmedclip"])
def test_zero_shot_logits_equal_transformers(loaded, name):
    bb = loaded(name)
    ids = bb.tokenize([f"An H&E image of {c}." for c in CLASSES])
    assert int(ids[0, -1]) == 49407  # the HF tokenizer pads with <|endoftext|>
    images = probe_images(bb)
    ours = zero_shot_logits(bb, ids, images)
    with torch.no_grad():
        direct = bb.model(input_ids=ids, pixel_values=images).logits_per_image
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["plip", "pubmedclip"])  # clip-vit-b32 shares plip's folder and code path
def test_context_injection_equals_written_prompt(loaded, name):
    positions = ("end", "front", "middle") if name == "plip" else ("end",)
    errors = injection_errors(loaded(name), CLASSES, PHRASE, positions)
    assert max(errors.values()) < 1e-5, errors


def test_trimming_keeps_the_first_end_of_text_token(loaded):
    bb = loaded("plip")
    ids = bb.tokenize([f"X X X X {c}." for c in CLASSES])
    eot = (ids == 49407).int().argmax(dim=1)
    assert torch.equal(bb.real_lengths(ids), eot + 1)
    learner = PromptLearner(bb, CLASSES, n_ctx=4)
    assert learner.ids.shape[1] == int(eot.max()) + 1 < 77
    with torch.no_grad():
        assert torch.allclose(bb.encode_text(ids), bb.encode_text(bb.trim(ids)), atol=1e-5)


def test_reference_parity_runs_plip_in_fp16(loaded):
    bb = loaded("plip", parity="reference")
    assert bb.info.extra["precision"] == "fp16" and bb.info.extra["parity"] == "reference"
    assert bb.dtype == torch.float16 and bb.model.text_projection.weight.dtype == torch.float16
    learner = PromptLearner(bb, CLASSES, init=PHRASE)
    assert learner.ctx.dtype == torch.float16
    with torch.no_grad():
        half = learner.text_features(bb)
        full = PromptLearner(loaded("plip"), CLASSES, init=PHRASE).text_features(loaded("plip"))
    assert torch.isfinite(half).all() and (half - full).abs().max() < 2e-2


def _tiny_clip_dir(folder, tokenizer_dir, drop: str | None = None, add: str | None = None):
    """A tiny CLIPModel (a few MB) for error paths; the architecture is not a registry model."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 16},
        projection_dim=16,
    )
    state = CLIPModel(config).state_dict()
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    folder.mkdir()
    config.to_json_file(str(folder / "config.json"))
    torch.save(state, folder / "pytorch_model.bin")
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    tokenizer = require_shared("configs/clip_tokenizer/vocab.json").parent
    folder = _tiny_clip_dir(tmp_path / "tiny", tokenizer, drop="text_projection.weight", add="extra.bias")
    with pytest.raises(WeightsError) as info:
        load_backbone({"name": "tiny", "path": str(folder)})
    message = str(info.value)
    assert "missing keys: text_projection.weight" in message and "unexpected keys: extra.bias" in message
    assert "pytorch_model.bin" in message


def test_missing_tokenizer_names_the_key(tmp_path):
    folder = _tiny_clip_dir(tmp_path / "notok", None)
    with pytest.raises(WeightsError, match="backbone.tokenizer_dir"):
        load_backbone({"path": str(folder)})
    tokenizer = require_shared("configs/clip_tokenizer/vocab.json").parent
    bb = load_backbone({"path": str(folder), "tokenizer_dir": str(tokenizer)})
    assert bb.info.name == "notok" and bb.info.extra["registry"] is None
