"""The shared-prefix text pass of causal towers (issue 18, item 1): the start token and the shared
context are computed once and each class's suffix attends to them. Features equal the full pass to 1e-5
and the gradients into the context to 1e-4 (relative to their size); bidirectional towers keep the full
pass."""

from __future__ import annotations

import contextlib

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


def test_prompt_training_with_the_shared_prefix_matches_the_full_pass(backbone):
    from calibprompt.losses import build_objective
    from calibprompt.methods.prompt_training import TrainSettings, train_prompts

    gen = torch.Generator().manual_seed(1)
    views = torch.randn(8, 2, backbone.info.embed_dim, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    trained = []
    for shared in (False, True):
        learner = PromptLearner(backbone, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(0))
        settings = TrainSettings(epochs=2, batch_size=4, optimizer="adam", shared_prefix=shared)
        result = train_prompts(backbone, learner, build_objective([{"name": "CE"}, {"name": "AS", "weight": 1.0}]),
                               views, labels, settings, seed=3)
        trained.append((learner.ctx.detach().clone(), result.losses))
    assert torch.allclose(trained[0][0], trained[1][0], atol=1e-5)
    assert trained[0][1] == pytest.approx(trained[1][1], abs=1e-5)


@pytest.mark.parametrize("eos", [2, 49407])  # PLIP's legacy end-token rule, and transformers' current one
def test_transformers_clip_prefix_pass_equals_the_full_pass(tmp_path, eos):
    import json

    from tests.conftest import require_shared
    from tests.random_models import write_random_hf_clip

    config = json.loads(require_shared("configs/plip/config.json").read_text())
    config["text_config"]["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = require_shared("configs/clip_tokenizer/vocab.json").parent
    folder = write_random_hf_clip(tmp_path / "plip", tmp_path / "config.json", tokenizer, seed=2)
    bb = load_backbone({"path": str(folder)})
    learner = PromptLearner(bb, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(0))
    outs = []
    for encode in (lambda e, i: bb.encode_embeddings(e, i), lambda e, i: bb.encode_shared_prefix(e, i, 5)):
        emb, ids = learner()
        out = encode(emb, ids)
        text = torch.nn.functional.normalize(out.float(), dim=-1)
        grad = torch.autograd.grad((text @ text.t()).logsumexp(dim=1).mean(), learner.ctx)[0]
        outs.append((out.detach(), grad))
    assert (outs[0][0] - outs[1][0]).abs().max() <= 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max() <= 1e-4 * outs[0][1].abs().max() + 1e-8


def test_grouped_prefix_pass_equals_each_configuration_alone(backbone):
    """Several configurations in one pass (a batched sweep): one prefix per configuration, gradients into
    each configuration's own context only."""
    learners = [PromptLearner(backbone, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    pieces = [learner() for learner in learners]
    emb, ids = torch.cat([e for e, _ in pieces]), torch.cat([i for _, i in pieces])
    joint = backbone.encode_shared_prefix(emb, ids, 5, groups=3)
    alone = torch.cat([backbone.encode_embeddings(e, i) for e, i in pieces])
    assert (joint - alone).abs().max() <= 1e-5
    joint[len(NAMES):].sum().backward()  # only the second and third configurations' features
    assert learners[0].ctx.grad is None or not learners[0].ctx.grad.any()
    assert learners[1].ctx.grad.abs().max() > 0 and learners[2].ctx.grad.abs().max() > 0
    with pytest.raises(ValueError, match="do not split into 2 groups") if backbone.info.family != "bert" \
            else contextlib.nullcontext():
        backbone.encode_shared_prefix(emb, ids, 5, groups=2)


def test_batched_training_with_shared_prefixes_matches_training_alone(backbone):
    from calibprompt.losses import build_objective
    from calibprompt.methods.prompt_training import TrainSettings, train_prompts, train_prompts_batched

    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 2, backbone.info.embed_dim, generator=gen) for _ in range(3)]
    labels = [torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]).roll(i) for i in range(3)]
    objective = build_objective([{"name": "CE"}, {"name": "AS", "weight": 1.0}])
    settings = TrainSettings(epochs=2, batch_size=4, optimizer="adam")
    joint = [PromptLearner(backbone, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    results = train_prompts_batched(backbone, joint, [objective] * 3, views, labels, settings, seeds=[3, 4, 5])
    for s in range(3):
        alone = PromptLearner(backbone, NAMES, n_ctx=4, generator=torch.Generator().manual_seed(s))
        result = train_prompts(backbone, alone, objective, views[s], labels[s], settings, seed=3 + s)
        assert torch.allclose(joint[s].ctx, alone.ctx, atol=1e-5)
        assert results[s].losses == pytest.approx(result.losses, abs=1e-5)
