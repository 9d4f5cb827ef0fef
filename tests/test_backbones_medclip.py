"""MedCLIP-ViT (Swin-T + Bio_ClinicalBERT) on plain transformers.

The shared data holds no Swin-T or Bio_ClinicalBERT *model* config, so the architecture comes from the
configs packaged with calibprompt (those of microsoft/swin-tiny-patch4-window7-224 and
emilyalsentzer/Bio_ClinicalBERT); the tokenizer is the real Bio_ClinicalBERT one from the shared data,
whose 28,996 entries must match the text tower. One random model is written once as the published
pytorch_model.bin (published key names, with the buffers that file carries)."""

from __future__ import annotations

import math

import pytest
import torch

from calibprompt.backbones import WeightsError
from calibprompt.backbones.medclip import MedClipBackbone, published_model, to_published
from calibprompt.backbones import load_backbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.conftest import require_shared
from tests.test_backbones import (  # noqa: F401 - hub_offline is an autouse fixture
    hub_offline, injection_errors, n_params, probe_images, written_prompts, zero_shot_logits,
)

CLASSES = ["normal", "no lung opacity, not normal"]
PHRASE = "a photo of the"
# 16 words, each one Bio_ClinicalBERT token: the paper's 16 context vectors, written out.
PHRASE16 = "there is a small patch of air in the left side of the chest on this"
MEDCLIP_PARAMS = 136_616_059  # Swin-T 27,519,354 + Bio_ClinicalBERT 108,310,272 + two 768x512 heads + logit scale


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.random_models import write_random_medclip

    tokenizer = require_shared("configs/bio_clinicalbert_tokenizer/vocab.txt").parent
    folder = tmp_path_factory.mktemp("medclip") / "medclip-vit"
    write_random_medclip(folder / "pytorch_model.bin", tokenizer, seed=6)
    return {"folder": folder, "tokenizer": tokenizer}


_loaded: dict = {}


@pytest.fixture(scope="module")
def loaded(files):
    def get(**extra):
        key = tuple(sorted(extra.items()))
        if key not in _loaded:
            _loaded[key] = load_backbone({"name": "medclip-vit", "path": str(files["folder"]),
                                          "tokenizer_dir": str(files["tokenizer"]), **extra})
        return _loaded[key]
    yield get
    _loaded.clear()


def official_logits(model, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """MedCLIP's own computation, written out independently of calibprompt's adapter."""
    with torch.no_grad():
        pixels = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
        img = model.vision_model.projection_head(model.vision_model.model(pixels)["pooler_output"])
        out = model.text_model.model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
        hs = out["hidden_states"]
        txt = torch.stack([hs[1], hs[2], hs[-1]]).permute(1, 0, 2, 3).mean(2).mean(1)
        txt = model.text_model.projection_head(txt)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return model.logit_scale.data.clamp(0, 4.6052).exp() * img @ txt.T


def test_architecture_and_published_key_names(loaded, files):
    bb = loaded()
    info = bb.info
    assert (info.family, info.embed_dim, info.token_dim, info.context_length) == ("medclip", 512, 768, 77)
    assert n_params(bb.model) == MEDCLIP_PARAMS
    saved = torch.load(files["folder"] / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    assert shapes["vision_model.model.embeddings.patch_embeddings.projection.weight"] == (96, 3, 4, 4)
    assert shapes["vision_model.model.encoder.layers.0.blocks.0.attention.self.query.weight"] == (96, 96)
    assert shapes["vision_model.model.encoder.layers.3.blocks.1.intermediate.dense.weight"] == (3072, 768)
    assert shapes["vision_model.model.layernorm.weight"] == (768,)
    assert shapes["vision_model.projection_head.weight"] == shapes["text_model.projection_head.weight"] == (512, 768)
    assert shapes["text_model.model.embeddings.word_embeddings.weight"] == (28996, 768) == (len(bb._tokenizer), 768)
    assert shapes["text_model.model.pooler.dense.weight"] == (768, 768) and shapes["logit_scale"] == ()
    assert not any(k.endswith("projection_head.bias") for k in saved)
    extra = info.extra
    assert (extra["medclip_max_length"], extra["medclip_norm"], extra["medclip_pooling"]) == (77, "medclip", "all")
    assert extra["format"] == "medclip" and extra["parity"] == "standard"
    # MedCLIP's own normalisation: grey, one channel.
    assert bb.preprocess.grey and bb.preprocess.mean == (0.5862785803043838,)
    assert probe_images(bb).shape == (1, 1, 224, 224)


@pytest.mark.parametrize("parity", ["standard", "reference"])
def test_zero_shot_logits_equal_medclip_formula(loaded, parity):
    bb = loaded(parity=parity)
    ids = bb.tokenize([f"A chest X-ray image of {c} patient" for c in CLASSES])
    assert ids.shape == (2, 77 if parity == "standard" else 25)
    images = probe_images(bb)
    ours = zero_shot_logits(bb, ids, images)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, official_logits(bb.model, images, ids), atol=1e-4, rtol=1e-5)


def test_context_injection_equals_written_prompt(loaded):
    errors = injection_errors(loaded(), CLASSES, PHRASE)
    assert max(errors.values()) < 1e-5, errors


def test_pooling_over_padding_means_no_trimming(loaded):
    bb = loaded()
    ids = bb.tokenize(["normal"])
    assert bb.real_lengths(ids).tolist() == [77] and bb.token_counts(ids).tolist() == [3]
    learner = PromptLearner(bb, CLASSES, n_ctx=16)
    assert learner.ids.shape == (2, 77)
    assert learner.name_lens.tolist() == [1, 7]  # class-name token counts, not padded lengths
    with torch.no_grad():  # padding changes the features: the reason trimming is off
        assert (bb.encode_text(ids) - bb.encode_text(ids[:, :3])).abs().max() > 1e-3


def test_reference_truncates_to_25_tokens_and_uses_clip_normalisation(loaded):
    """Q2: the RSNA18 prompt 'X*16 no lung opacity, not normal.' has 26 tokens and loses its period."""
    std, ref = loaded(), loaded(parity="reference")
    assert ref.info.extra["medclip_max_length"] == 25 and ref.info.extra["medclip_norm"] == "clip"
    assert not ref.preprocess.grey and len(ref.preprocess.mean) == 3 and probe_images(ref).shape[1] == 3
    tok = std._tokenizer
    full = std.tokenize([PHRASE16 + " " + CLASSES[1] + "."])
    cut = ref.tokenize([PHRASE16 + " " + CLASSES[1] + "."])
    assert int(std.token_counts(full)[0]) == 26 and cut.shape[1] == 25
    assert tok.convert_ids_to_tokens(cut[0, -3:].tolist()) == ["not", "normal", "[SEP]"]
    assert tok.convert_ids_to_tokens(full[0, 23:26].tolist()) == ["normal", ".", "[SEP]"]
    # Injection stays exact under truncation: the learner equals the written prompt cut the same way.
    errors = injection_errors(ref, CLASSES, PHRASE16, positions=("end",))
    assert errors["end"] < 1e-5, errors
    with torch.no_grad():
        a = PromptLearner(std, CLASSES, init=PHRASE16).text_features(std)
        b = PromptLearner(ref, CLASSES, init=PHRASE16).text_features(ref)
    assert (a - b).abs().max() > 1e-3  # 25 vs 77 positions pooled, and the lost period


def test_masked_pooling_makes_trimming_exact(loaded):
    std = loaded()
    masked = MedClipBackbone(std.model, std._tokenizer, pooling="masked")
    ids = masked.tokenize(written_prompts(PHRASE, CLASSES, "end"))
    assert torch.equal(masked.real_lengths(ids), masked.token_counts(ids))
    with torch.no_grad():
        assert (masked.encode_text(ids) - masked.encode_text(masked.trim(ids))).abs().max() < 1e-5
        assert (masked.encode_text(ids) - std.encode_text(ids)).abs().max() > 1e-3
    errors = injection_errors(masked, CLASSES, PHRASE, positions=("end",))
    assert errors["end"] < 1e-5, errors


def test_logit_scale_is_clamped_like_medclip(loaded):
    bb = loaded()
    assert math.isclose(float(bb.logit_scale), 1 / 0.07, rel_tol=1e-6)
    saved = bb.model.logit_scale.data.clone()
    try:
        bb.model.logit_scale.data.fill_(6.0)
        assert math.isclose(float(bb.logit_scale), 100.0, rel_tol=1e-3)
    finally:
        bb.model.logit_scale.data.copy_(saved)


def test_strict_loading_lists_missing_and_unexpected_keys(loaded):
    state = to_published(dict(loaded().model.state_dict()))
    del state["text_model.projection_head.weight"]
    state["text_model.projection_head.bias"] = torch.zeros(512)
    with pytest.raises(WeightsError) as info:
        published_model(state, "truncated.bin")
    message = str(info.value)
    assert "missing keys: text_model.projection_head.weight" in message
    assert "unexpected keys: text_model.projection_head.bias" in message


def test_wrong_tokenizer_or_missing_tokenizer_is_named(files, tmp_path):
    from tests.random_models import write_standin_wordpiece_vocab

    write_standin_wordpiece_vocab(tmp_path / "vocab.txt", 30522)
    with pytest.raises(WeightsError, match="30522 entries.*28996"):
        load_backbone({"name": "medclip-vit", "path": str(files["folder"]), "tokenizer_dir": str(tmp_path)})
    with pytest.raises(WeightsError, match="backbone.tokenizer_dir"):
        load_backbone({"name": "medclip-vit", "path": str(files["folder"])})
