"""The engine's paths through ``calibprompt.engine.pipeline`` (sequential and batched), and the
unavoidable parts of a sweep timed in isolation."""

from __future__ import annotations

import statistics

import numpy as np
import torch

from benchmarks.engine_bench.harness import Clock, compute_metrics, objective_for
from benchmarks.engine_bench.reference import PathStats

def engine_resolved(alpha: float, lam: float, settings, seed: int, n_ctx: int, *, augment: bool, n_views: int,
                    aug_seed: int) -> dict:
    """The resolved run config of one benchmark configuration (CalibPrompt with this alpha and lambda)."""
    from dataclasses import asdict

    from calibprompt.methods import resolve_method

    return {"seed": seed, "resolved_method": resolve_method("calibprompt", alpha=alpha, lambda_as=lam).as_config(),
            "train": {**asdict(settings), "augment": augment, "n_views": n_views, "aug_seed": aug_seed},
            "prompt": {"n_ctx": n_ctx, "init": None, "position": "end", "csc": False, "init_std": 0.02}}


def engine_features(cache, backbone, dataset, train_s, test_s, *, augment, n_views, aug_seed, device):
    """As ``calibprompt.engine.pipeline.encode``: test features and training views in one encoder stream."""
    (test_feats,), views = cache.run_features(backbone, dataset, [test_s], train_s,
                                              n_views=n_views if augment else None, aug_seed=aug_seed)
    return test_feats.to(device), views


def run_engine_sequential(backbone, dataset, train_s, test_s, configs, settings, seed, cache, *,
                          augment, n_views, aug_seed, n_ctx, device, stats: PathStats):
    """``calibprompt train``'s path (the stages of ``calibprompt.engine.pipeline``), one configuration after
    another over one feature cache. Returns (metrics per config, logits per config, cold-encoding seconds
    of the first config)."""
    from calibprompt.engine import pipeline

    test_labels = np.array([s.label for s in test_s])
    metrics, logits_all, encode_first = [], [], 0.0
    for c, (alpha, lam) in enumerate(configs):
        encoded = cache.encoded
        resolved = engine_resolved(alpha, lam, settings, seed, n_ctx, augment=augment, n_views=n_views,
                                   aug_seed=aug_seed)
        with Clock(device) as whole:
            method = pipeline.build_method(resolved)
            with Clock(device) as enc:
                feats = pipeline.encode(cache, backbone, dataset, method, resolved, [test_s], train_s, True, False)
            fitted = pipeline.fit(method, backbone, dataset, resolved, train_s, feats.train_views, None, device)
            logits = pipeline.logits(fitted.head.to(device), feats.evals[0].to(device))
            metrics.append(compute_metrics(logits, test_labels))
        logits_all.append(logits)
        if c == 0:
            encode_first = enc.seconds
        k, length = fitted.info["prompt_shape"]
        stats.per_config_seconds.append(whole.seconds)
        stats.images_encoded += cache.encoded - encoded
        stats.text_tokens += fitted.info["text_tokens"] + k * length
        stats.steps += fitted.info["steps"]
        stats.prompt_length = int(length)
    stats.seconds = sum(stats.per_config_seconds)
    return metrics, logits_all, encode_first


def run_engine_batched(backbone, dataset, train_s, test_s, configs, settings, seed, cache, *,
                       augment, n_views, aug_seed, n_ctx, device, stats: PathStats, max_prompts=None):
    """All configurations in lockstep: one text-encoder pass per step over the stacked prompts."""
    from calibprompt.methods.prompt_learner import PromptLearner
    from calibprompt.engine.pipeline import logits as head_logits
    from calibprompt.methods import LinearHead
    from calibprompt.methods.prompt_training import batched_text_features, train_prompts_batched

    labels = torch.tensor([s.label for s in train_s])
    test_labels = np.array([s.label for s in test_s])
    scale = backbone.logit_scale.float().to(device)
    encoded = cache.encoded
    with Clock(device) as whole:
        test_feats, views = engine_features(cache, backbone, dataset, train_s, test_s, augment=augment,
                                            n_views=n_views, aug_seed=aug_seed, device=device)
        learners = [PromptLearner(backbone, dataset.classnames, n_ctx=n_ctx,
                                  generator=torch.Generator().manual_seed(seed)).to(device) for _ in configs]
        results = train_prompts_batched(backbone, learners, [objective_for(a, lam) for a, lam in configs],
                                        views, labels, settings, seed, max_prompts=max_prompts)
        texts = batched_text_features(backbone, learners, max_prompts=max_prompts)
        logits_all = [head_logits(LinearHead(t, scale=float(scale), normalize_weight=False).to(device), test_feats)
                      for t in texts]
        metrics = [compute_metrics(lg, test_labels) for lg in logits_all]
    stats.seconds = whole.seconds
    stats.images_encoded += cache.encoded - encoded
    stats.text_tokens += sum(r.text_tokens for r in results) + len(learners) * int(learners[0].ids.numel())
    stats.steps = results[0].steps  # steps of the shared pass
    return metrics, logits_all


# ---------------------------------------------------------------------------------------------------
# the unavoidable parts, timed in isolation
# ---------------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int, device) -> float:
    times = []
    for _ in range(repeats):
        with Clock(device) as clock:
            fn()
        times.append(clock.seconds)
    return statistics.median(times)


def time_isolated(backbone, dataset, images_needed: int, encode_batch: int, seq_steps: int, batched_steps: int,
                  n_configs: int, n_ctx: int, device, image_batches: int = 2, text_repeats: int = 5) -> dict:
    """The engine's unavoidable work, timed in isolation: ``images_needed`` images through the image
    encoder (per-image time of full ``encode_batch`` batches of random pixels, median of
    ``image_batches``), the text-encoder steps it ran (forward + backward to the context, K prompts;
    or the stacked C*K prompts of the batched engine) and its evaluation text passes."""
    from calibprompt.methods.prompt_learner import PromptLearner
    from calibprompt.methods.prompt_training import batched_text_features

    size = backbone.preprocess.image_size
    dtype = next(backbone.parameters()).dtype
    x = torch.randn(encode_batch, 3, size, size, device=device, dtype=dtype)

    def enc():
        with torch.no_grad():
            backbone.encode_image(x)

    per_batch = _median_time(enc, image_batches, device)
    image_seconds = per_batch / encode_batch * images_needed

    learners = [PromptLearner(backbone, dataset.classnames, n_ctx=n_ctx,
                              generator=torch.Generator().manual_seed(i)).to(device) for i in range(n_configs)]

    def text_step():
        feats = learners[0].text_features(backbone)
        feats.backward(torch.ones_like(feats))
        learners[0].ctx.grad = None

    def batched_step():
        pieces = [lr() for lr in learners]
        emb = torch.cat([e for e, _ in pieces])
        ids = torch.cat([i for _, i in pieces])
        feats = backbone.encode_embeddings(emb, ids).float()
        feats.backward(torch.ones_like(feats))
        for lr in learners:
            lr.ctx.grad = None

    def text_eval():
        with torch.no_grad():
            learners[0].text_features(backbone)

    def batched_eval():
        batched_text_features(backbone, learners)

    step = _median_time(text_step, text_repeats, device)
    bstep = _median_time(batched_step, max(2, text_repeats // 2), device)
    ev = _median_time(text_eval, text_repeats, device)
    bev = _median_time(batched_eval, 2, device)
    return {
        "image_seconds": image_seconds,
        "image_seconds_per_image": per_batch / encode_batch, "image_batch": encode_batch,
        "images": int(images_needed),
        "text_step_seconds": step, "text_steps": seq_steps,
        "text_eval_seconds": ev,
        "batched_step_seconds": bstep, "batched_steps": batched_steps, "batched_eval_seconds": bev,
        "unavoidable_sequential": image_seconds + seq_steps * step + n_configs * ev,
        "unavoidable_batched": image_seconds + batched_steps * bstep + bev,
    }
