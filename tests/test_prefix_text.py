"""The shared-prefix text pass of causal towers (issue 18, item 1): the start token and the shared
context are computed once and each class's suffix attends to them. Features equal the full pass to 1e-5
and the gradients into the context to 1e-4 (relative to their size); bidirectional towers keep the full
pass."""

from __future__ import annotations

import pytest
import torch

from calibprompt.backbones import load_backbone
from calibprompt.methods.prompt_learner import PromptLearner
from tests.tiny_models import tiny_model_dir

NAMES = ["normal", "tumor tissue", "adipose", "lymphocytes of the colon", "debris"]


@pytest.fixture(scope="module", params=["clip", "bert"])
def backbone(request, tmp_path_factory):
    return load_backbone({"path": str(tiny_model_dir(tmp_path_factory.mktemp(request.param), request.param))})


@pytest.mark.parametrize("n_ctx", [1, 4, 8])
def test_prefix_pass_equals_the_full_pass(backbone, n_ctx):
    learner = PromptLearner(backbone, NAMES, n_ctx=n_ctx, generator=torch.Generator().manual_seed(n_ctx))
    feats, grads = [], []
    for encode in (lambda e, i: backbone.encode_embeddings(e, i),
                   lambda e, i: backbone.encode_shared_prefix(e, i, 1 + n_ctx)):
        emb, ids = learner()
        out = encode(emb, ids)
        text = torch.nn.functional.normalize(out.float(), dim=-1)
        loss = (text @ text.t()).logsumexp(dim=1).mean()  # a loss of the kind AS and CE put on the text side
        grads.append(torch.autograd.grad(loss, learner.ctx)[0])
        feats.append(out.detach())
    assert (feats[0] - feats[1]).abs().max() <= 1e-5
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[0].abs().max() + 1e-8
    assert grads[0].abs().max() > 0
    if backbone.info.family == "bert":  # bidirectional: the full pass, bit for bit
        assert torch.equal(feats[0], feats[1])
