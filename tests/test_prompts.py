"""Prompt learner and text side: injection exactness, class positions, trimming exactness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibprompt.backbones.open_clip_model import OpenClipBackbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.tiny_models import tiny_model_dir

CLASSES = ["lung opacity", "normal"]


@pytest.fixture(scope="module", params=["clip", "bert"])
def backbone(request, tmp_path_factory):
    return OpenClipBackbone.from_dir(tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param))


def _encode(backbone, texts):
    return F.normalize(backbone.encode_text(backbone.tokenize(texts)).float(), dim=-1)


@pytest.mark.parametrize("position,texts", [
    ("end", ["x x x x lung opacity.", "x x x x normal."]),
    ("front", ["lung opacity x x x x.", "normal x x x x."]),
    ("middle", ["x x lung opacity x x.", "x x normal x x."]),
])
def test_context_set_to_word_embeddings_equals_ordinary_encoding(backbone, position, texts):
    learner = PromptLearner(backbone, CLASSES, n_ctx=4, position=position)
    words = backbone.tokenize(["x x x x"])
    with torch.no_grad():
        learner.ctx.copy_(backbone.embed_tokens(words)[0, 1:5])
    got = learner.text_features(backbone)
    assert torch.allclose(got, _encode(backbone, texts), atol=1e-5)


def test_trimmed_text_encoding_equals_full_length(backbone):
    """Trimming to the longest real sequence is exact (EOT pooling under a causal mask; CLS pooling
    under an attention mask)."""
    ids = backbone.tokenize(["an image of lung opacity.", "normal"])
    full = backbone.encode_embeddings(backbone.embed_tokens(ids), ids)
    trimmed_ids = backbone.trim(ids)
    assert trimmed_ids.shape[1] < ids.shape[1]
    trimmed = backbone.encode_embeddings(backbone.embed_tokens(trimmed_ids), trimmed_ids)
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert torch.allclose(full, backbone.encode_text(ids), atol=1e-5)


def test_word_initialisation_and_shapes(backbone):
    learner = PromptLearner(backbone, CLASSES, init="an image of")
    assert learner.n_ctx == 3 and learner.ctx.shape == (3, backbone.info.token_dim)
    got = learner.text_features(backbone)
    assert torch.allclose(got, _encode(backbone, ["an image of lung opacity.", "an image of normal."]), atol=1e-5)
    csc = PromptLearner(backbone, CLASSES, n_ctx=5, csc=True, generator=torch.Generator().manual_seed(0))
    assert csc.ctx.shape == (2, 5, backbone.info.token_dim)
    assert abs(float(csc.ctx.detach().std()) - 0.02) < 0.01


def test_only_context_receives_gradients(backbone):
    learner = PromptLearner(backbone, CLASSES, n_ctx=4)
    learner.text_features(backbone).sum().backward()
    assert learner.ctx.grad is not None and float(learner.ctx.grad.abs().sum()) > 0
    assert all(p.grad is None for p in backbone.parameters())


def test_bad_position_is_an_error(backbone):
    with pytest.raises(ValueError, match="position"):
        PromptLearner(backbone, CLASSES, position="left")


def test_prompts_longer_than_the_text_encoder_get_a_note(caplog):
    import logging

    from calibprompt.methods.prompt_learner import PromptLearner
    from tests.random_models import random_open_clip_backbone
    from tests.tiny_models import TINY_CLIP

    backbone = random_open_clip_backbone(TINY_CLIP, "tiny-clip")  # 77 tokens
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        PromptLearner(backbone, ["normal", "tumor"], n_ctx=70)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="calibprompt"):
        PromptLearner(backbone, ["normal", "tumor"], n_ctx=74)
    assert any("class names are cut" in r.getMessage() and "needs 78 tokens" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="does not fit"):
        PromptLearner(backbone, ["normal", "tumor"], n_ctx=76)
