"""GPU readiness on the CPU (issue 18, item 5): mixed-precision image encoding (``encode.amp``) keyed apart
from fp32 features, and a prompt-training loop that does not read from the device inside a step (what
would make a GPU wait every step)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from calibprompt.config import config_hash, resolve
from calibprompt.features import FeatureCache
from calibprompt.methods.prompt_learner import PromptLearner
from calibprompt.methods.prompt_training import TrainSettings, train_prompts
from tests.tiny_models import tiny_model_dir, write_image_folder


PATHS: dict = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from calibprompt.backbones import load_backbone
    from calibprompt.data import open_dataset

    root = tmp_path_factory.mktemp("ready")
    model = tiny_model_dir(root / "model", "clip")
    backbone = load_backbone({"path": str(model)})
    dataset = open_dataset({"source": "folder", "path": str(write_image_folder(root / "images", n_train=4, n_test=6))})
    PATHS.update(model=model, images=root / "images")
    return backbone, dataset


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_features_are_close_and_cached_apart(tiny, tmp_path, amp):
    backbone, dataset = tiny
    samples = dataset.samples_in("test")
    fp32 = FeatureCache(tmp_path / "c")
    exact = fp32.features(backbone, dataset, samples)
    mixed_cache = FeatureCache(tmp_path / "c", amp=amp)
    mixed = mixed_cache.features(backbone, dataset, samples)
    assert mixed_cache.encoded == len(samples)  # other keys: the fp32 rows are not served for amp
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, exact)
    assert F.cosine_similarity(mixed, exact).min() > 0.99
    again = FeatureCache(tmp_path / "c")
    assert torch.equal(again.features(backbone, dataset, samples), exact) and again.encoded == 0
    with pytest.raises(ValueError, match="encode amp must be one of none, bf16, fp16, got 'fp8'"):
        FeatureCache(tmp_path / "c", amp="fp8")


def test_amp_is_part_of_a_runs_identity_only_when_on(tmp_path):
    from calibprompt.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"backbone: {{name: micro-medmnist}}\ndata: {{source: folder, path: {tmp_path}}}\nmethod: coop-ce\n")
    plain = config_hash(resolve(load_config(path)))
    assert config_hash(resolve(load_config(path, ["encode.amp=none"]))) == plain
    assert config_hash(resolve(load_config(path, ["encode.workers=0"]))) == plain
    assert config_hash(resolve(load_config(path, ["encode.amp=bf16"]))) != plain
    with pytest.raises(ConfigError, match="encode.amp"):
        resolve(load_config(path, ["encode.amp=fp8"]))


_WATCHED = ("prompt_training.py", "prefix.py", "open_clip_model.py")


def _count_reads(monkeypatch) -> dict:
    """Count the tensor reads that make the host wait for the device (float(), int(), bool(), .item(),
    .tolist()) made from the training loop and the text pass (not from the losses' CPU-only label check)."""
    counts = {"reads": 0, "tolist": 0}
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(_WATCHED):
                counts["tolist" if _name == "tolist" else "reads"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_training_steps_do_not_read_from_the_device(tiny, monkeypatch):
    backbone, dataset = tiny
    from calibprompt.losses import build_objective

    views = torch.randn(8, 2, backbone.info.embed_dim)
    labels = torch.tensor([0, 1] * 4)
    per_epochs = {}
    for epochs in (2, 5):
        learner = PromptLearner(backbone, list(dataset.classnames), n_ctx=4, generator=torch.Generator().manual_seed(0))
        counts = _count_reads(monkeypatch)
        result = train_prompts(backbone, learner, build_objective([{"name": "CE"}, {"name": "AS"}]), views, labels,
                               TrainSettings(epochs=epochs, batch_size=4), seed=0)
        monkeypatch.undo()
        assert result.steps == 2 * epochs
        per_epochs[epochs] = dict(counts)
    # 6 more steps, 3 more epochs: one read of the losses per epoch and no read per step
    assert per_epochs[5]["tolist"] - per_epochs[2]["tolist"] == 3
    assert per_epochs[5]["reads"] == per_epochs[2]["reads"]


def test_the_shared_prefix_layout_is_computed_once_per_prompt_tensor(tiny, monkeypatch):
    backbone, dataset = tiny
    import calibprompt.backbones.prefix as prefix

    made = []
    real = prefix.SuffixRows
    monkeypatch.setattr(prefix, "SuffixRows", lambda *a, **k: made.append(a) or real(*a, **k))
    learner = PromptLearner(backbone, ["normal", "tumor tissue"], n_ctx=4, generator=torch.Generator().manual_seed(0))
    first = learner.text_features(backbone, shared_prefix=True)
    assert torch.equal(learner.text_features(backbone, shared_prefix=True), first)
    assert len(made) == 1  # the second pass reused the layout
    other = PromptLearner(backbone, ["a", "much longer class name"], n_ctx=4, generator=torch.Generator().manual_seed(0))
    full = other.text_features(backbone, shared_prefix=False)
    assert torch.allclose(other.text_features(backbone, shared_prefix=True), full, atol=1e-5)  # new ids: new layout
    assert len(made) == 2
    learner.text_features(backbone, shared_prefix=True)
    assert len(made) == 2  # both layouts are kept (a batched trainer alternates between chunks)


def test_a_shared_cache_follows_each_runs_amp(tiny, tmp_path):
    """A sweep worker holds one cache per root (built without a config): a run asking for bf16 still gets
    bf16 features, under bf16 keys."""
    import yaml

    from calibprompt.config import load_config
    from calibprompt.engine.run import run

    model, images = PATHS["model"], PATHS["images"]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)},
                                    "method": "zeroshot", "shots": 2, "encode": {"amp": "bf16"}, "eval": {"bootstrap": 0}}))
    shared = FeatureCache(tmp_path / "cache")  # amp "none", as tasks.shared_cache builds it
    result = run(load_config(path), tmp_path / "out", quiet=True, cache=shared)
    assert result["images_encoded"] > 0 and shared.encoded == 0  # encoded by its bf16 sibling
    backbone, dataset = tiny
    again = FeatureCache(tmp_path / "cache", amp="bf16")
    again.features(backbone, dataset, dataset.samples_in("test"))
    assert again.encoded == 0  # stored under the bf16 keys


def test_fit_context_checks_labels_once_before_any_device_work():
    from calibprompt.methods import FitContext

    with pytest.raises(ValueError, match=r"training labels must lie in \[0, 1\] \(2 classes\), got values in \[0, 5\]"):
        FitContext(backbone=None, classnames=["a", "b"], train_views=torch.zeros(2, 1, 4), labels=torch.tensor([0, 5]),
                   zs_text=torch.zeros(2, 4), scale=1.0, seed=0, device=torch.device("cpu"))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_prompt_training_follows_full_precision(tiny, amp):
    """train.amp runs the text pass and losses under autocast (fp16 with loss scaling); on the CPU the
    trained context stays close to the fp32 one, and the batched trainer accepts it too."""
    from calibprompt.losses import build_objective
    from calibprompt.methods.prompt_training import train_prompts_batched

    backbone, dataset = tiny
    gen = torch.Generator().manual_seed(0)
    views, labels = torch.randn(8, 1, backbone.info.embed_dim, generator=gen), torch.tensor([0, 1] * 4)
    objective = build_objective([{"name": "CE"}, {"name": "AS", "weight": 1.0}])
    trained = {}
    for mode in ("none", amp):
        learner = PromptLearner(backbone, list(dataset.classnames), n_ctx=4, generator=torch.Generator().manual_seed(0))
        start = learner.ctx.detach().clone()
        result = train_prompts(backbone, learner, objective, views, labels,
                               TrainSettings(epochs=3, batch_size=4, optimizer="adam", lr=0.01, amp=mode), seed=0)
        trained[mode] = (learner.ctx.detach().clone(), result.losses, result.skipped_steps)
    moved = (trained["none"][0] - start).abs().max()
    assert moved > 1e-3  # training did something
    assert torch.isfinite(trained[amp][0]).all() and (trained[amp][0] - start).abs().max() > 1e-3
    if amp == "bf16":
        assert (trained[amp][0] - trained["none"][0]).abs().max() < 0.2 * moved
        assert trained[amp][1] == pytest.approx(trained["none"][1], rel=0.05)
    # fp16: the loss scaler may skip steps whose scaled gradients overflow, so 6 steps can end elsewhere
    # than fp32's 6; what is checked is that it trains, stays finite, and batching does not change it
    joint = [PromptLearner(backbone, list(dataset.classnames), n_ctx=4, generator=torch.Generator().manual_seed(s))
             for s in range(2)]
    results = train_prompts_batched(backbone, joint, [objective] * 2, views, labels,
                                    TrainSettings(epochs=3, batch_size=4, optimizer="adam", lr=0.01, amp=amp), seeds=0)
    assert all(len(r.losses) == 3 for r in results) and all(torch.isfinite(j.ctx).all() for j in joint)
    # each configuration keeps its own loss scaler: trained together it ends where it ends alone
    assert (joint[0].ctx - trained[amp][0]).abs().max() < 1e-3 * moved + 1e-6
    assert results[0].skipped_steps == trained[amp][2]  # the same steps skipped as alone (none for bf16)
    assert amp == "fp16" or trained[amp][2] == 0
    with pytest.raises(ValueError, match="train.amp 'fp8'"):
        TrainSettings(amp="fp8").validate()


def test_fp16_training_refuses_a_half_precision_context(tiny):
    from calibprompt.methods.prompt_training import grad_scaler

    backbone, dataset = tiny
    learner = PromptLearner(backbone, list(dataset.classnames), n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert grad_scaler(torch.device("cpu"), "bf16", learner) is None
    assert grad_scaler(torch.device("cpu"), "fp16", learner).get_scale() == 2.0**10
    learner.ctx.data = learner.ctx.data.half()  # what a backbone loaded in fp16 gives
    with pytest.raises(ValueError, match="fp16 needs a float32 context"):
        grad_scaler(torch.device("cpu"), "fp16", learner)
