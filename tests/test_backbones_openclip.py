"""open_clip CLIP backbones: QuiltNet-B-32/B-16 (open_clip hub folders) and the OpenAI-format files in
which the official code ships PLIP and QuiltNet (and OpenAI ships CLIP ViT-B/16).

Architectures come from the real open_clip configs in the shared data folder. One random ViT-B/32 is
written as a QuiltNet-B-32 hub folder *and* as OpenAI-format .pt files (fp32 for QuiltNet, fp16 like
OpenAI's own files for PLIP); one random ViT-B/16 as a QuiltNet-B-16 hub folder and as CLIP ViT-B/16's
OpenAI-format .pt."""

from __future__ import annotations

import json

import pytest
import torch

from calibprompt.backbones import WeightsError
from tests.random_models import random_open_clip_backbone
from calibprompt.backbones.openai_format import load_openai, openai_state_dict
from calibprompt.backbones import load_backbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.conftest import require_shared
from tests.test_backbones import (  # noqa: F401 - hub_offline is an autouse fixture
    assert_zero_shot_equals_open_clip, hub_offline, injection_errors, n_params, probe_images,
    zero_shot_logits,
)

CLASSES = ["adipose tissue", "colorectal adenocarcinoma epithelium"]
PHRASE = "a photo of a"
PARAMS = {"b32": 151_277_313, "b16": 149_620_737}  # OpenAI CLIP ViT-B/32 and ViT-B/16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip")
    out = {}
    for arch, config, seed in (("b32", "ViT-B-32-quickgelu.json", 2), ("b16", "ViT-B-16.json", 3)):
        model_cfg = json.loads(require_shared(f"configs/open_clip/{config}").read_text())
        bb = random_open_clip_backbone(model_cfg, name=arch, seed=seed)
        name = "quiltnet-b32" if arch == "b32" else "quiltnet-b16"
        out[name] = bb.save_dir(root / name, weights_name="open_clip_pytorch_model.bin")
        if arch == "b32":
            torch.save(openai_state_dict(bb), root / "quiltnet_b32.pt")
            torch.save(openai_state_dict(bb, dtype=torch.float16, meta_keys=True), root / "plip_vit_b32.pt")
            out["quiltnet-b32.pt"], out["plip.pt"] = root / "quiltnet_b32.pt", root / "plip_vit_b32.pt"
        else:
            torch.save(openai_state_dict(bb, dtype=torch.float16, meta_keys=True), root / "ViT-B-16.pt")
            out["clip-vit-b16.pt"] = root / "ViT-B-16.pt"
    return out


_loaded: dict = {}

CASES = {  # case -> (registry name, file key, architecture, format, quick_gelu)
    "quiltnet-b32": ("quiltnet-b32", "quiltnet-b32", "b32", "open_clip", True),
    "quiltnet-b32.pt": ("quiltnet-b32", "quiltnet-b32.pt", "b32", "openai", True),
    "plip.pt": ("plip", "plip.pt", "b32", "openai", True),
    "quiltnet-b16": ("quiltnet-b16", "quiltnet-b16", "b16", "open_clip", False),
    "clip-vit-b16.pt": ("clip-vit-b16", "clip-vit-b16.pt", "b16", "openai", True),
}


@pytest.fixture(scope="module")
def loaded(files):
    def get(case: str, **extra):
        key = (case, tuple(sorted(extra.items())))
        if key not in _loaded:
            name, file_key = CASES[case][:2]
            _loaded[key] = load_backbone({"name": name, "path": str(files[file_key]), **extra})
        return _loaded[key]
    yield get
    _loaded.clear()


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_and_recorded_switches(loaded, case):
    name, _, arch, fmt, quick_gelu = CASES[case]
    bb = loaded(case)
    info = bb.info
    assert (info.name, info.family, info.embed_dim, info.token_dim, info.context_length) == (name, "clip", 512, 512, 77)
    assert n_params(bb.model) == PARAMS[arch]
    shapes = {k: tuple(v.shape) for k, v in bb.model.state_dict().items()}
    patch = 32 if arch == "b32" else 16
    assert shapes["visual.conv1.weight"] == (768, 3, patch, patch)
    assert shapes["token_embedding.weight"] == (49408, 512) and shapes["text_projection"] == (512, 512)
    assert info.extra["format"] == fmt and info.extra["quick_gelu"] is quick_gelu
    assert info.extra["precision"] == "fp32" and bb.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in bb.parameters())  # fp16 files are cast on load


@pytest.mark.parametrize("case", ["quiltnet-b32", "quiltnet-b16", "clip-vit-b16.pt"])
def test_zero_shot_logits_equal_open_clip(loaded, case):
    bb = loaded(case)
    ids = bb.tokenize([f"An H&E image of {c}." for c in CLASSES])
    assert_zero_shot_equals_open_clip(bb, ids)


@pytest.mark.parametrize("case", ["quiltnet-b32", "quiltnet-b16", "clip-vit-b16.pt"])
def test_context_injection_equals_written_prompt(loaded, case):
    # All three class-token positions once per adapter; the class at the end (the paper's) elsewhere.
    positions = ("end", "front", "middle") if case == "quiltnet-b32" else ("end",)
    errors = injection_errors(loaded(case), CLASSES, PHRASE, positions)
    assert max(errors.values()) < 1e-5, errors


def test_hub_folder_and_openai_file_agree(loaded):
    """Q18: the same weights through the open_clip hub folder and the OpenAI-format file (which the
    official code uses) give the same features when the hub config says QuickGELU."""
    hub, pt = loaded("quiltnet-b32"), loaded("quiltnet-b32.pt")
    ids = hub.tokenize([f"An H&E image of {c}." for c in CLASSES])
    images = probe_images(hub)
    torch.testing.assert_close(zero_shot_logits(hub, ids, images), zero_shot_logits(pt, ids, images),
                               atol=1e-5, rtol=0)


def test_reference_parity_is_openai_style_fp16(loaded):
    bb = loaded("quiltnet-b32.pt", parity="reference")
    assert bb.info.extra["precision"] == "fp16" and bb.dtype == torch.float16
    m = bb.model
    # As OpenAI's convert_weights: matmul weights in fp16, LayerNorm and embeddings stay fp32.
    assert m.visual.conv1.weight.dtype == m.text_projection.dtype == torch.float16
    assert m.ln_final.weight.dtype == m.token_embedding.weight.dtype == torch.float32
    learner = PromptLearner(bb, CLASSES, init=PHRASE)
    assert learner.ctx.dtype == torch.float16
    ref = loaded("quiltnet-b32.pt")
    with torch.no_grad():
        half = learner.text_features(bb)
        full = PromptLearner(ref, CLASSES, init=PHRASE).text_features(ref)
    assert torch.isfinite(half).all() and (half - full).abs().max() < 2e-2


def test_strict_loading_lists_missing_and_unexpected_keys(files):
    from calibprompt.backbones.weights import read_state_dict

    state = read_state_dict(files["quiltnet-b32.pt"])
    del state["ln_final.bias"]
    state["visual.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        load_openai(state, "truncated.pt", "quiltnet-b32")
    assert "missing keys: ln_final.bias" in str(info.value) and "unexpected keys: visual.extra" in str(info.value)


def test_wrong_architecture_or_format_is_rejected(files):
    with pytest.raises(WeightsError, match="is not a plip checkpoint.*patch_size: file 16"):
        load_backbone({"name": "plip", "path": str(files["clip-vit-b16.pt"])})
    with pytest.raises(WeightsError, match="quiltnet-b16 loads from open_clip"):
        load_backbone({"name": "quiltnet-b16", "path": str(files["clip-vit-b16.pt"])})
