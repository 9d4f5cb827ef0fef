#!/usr/bin/env python
"""Engine benchmark (issue 6): calibprompt's cached-feature engine against a faithful reference loop.

Both paths run in one process on the same model object, the same synthetic PNG dataset (opened through
``calibprompt.data``, so image decoding is paid by both) and the same CalibPrompt objective
(LS(alpha) + SMAC(alpha) + lambda * AS), over a sweep of (alpha, lambda) configurations:

* **reference** (CoOp/Dassl-style, like the official CalibPrompt code): every training step decodes its
  batch, runs the frozen image encoder (under ``no_grad``) and the text encoder on the full
  ``context_length`` (256 for BiomedCLIP) token sequences; every run re-encodes the whole test set
  (batch 100, text features recomputed per test batch as CoOp's ``CustomCLIP.forward`` does). Same
  batch size, optimizer, schedule, losses and initial context as the engine; its batch order and
  augmentation views are drawn exactly as the engine draws them, so the two can be compared number
  for number. It shares nothing between configurations, so it is timed on ``--ref-configs`` of them
  and its mean per-configuration time multiplied by the sweep size (said so in the output).
* **engine, sequential** (what ``calibprompt run`` does per configuration): ``FeatureCache`` encodes each
  image (and view) once, ``train_prompts`` tunes the context over cached features with trimmed prompts,
  ``predict_logits`` scores the cached test features. The first configuration starts from an empty
  cache, so its wall time is the single-run time; the sweep's wall time is literal.
* **engine, batched** (past the targets): ``train_prompts_batched`` trains all configurations in
  lockstep with one text-encoder pass per step over their stacked prompts. It reuses the features the
  sequential sweep cached; its sweep time is that block plus the cold encoding time measured in the
  sequential sweep's first configuration (printed as such).

``overhead_ratio`` = engine sweep time / its unavoidable parts, each timed in isolation in this
process: one image-encoder pass per image and view the engine encoded (same batch sizes, random pixels)
+ the text-encoder steps it ran (forward + backward, same shapes) + its evaluation text passes.

Run ``python benchmarks/bench_engine.py --quick --json out.json`` (10 epochs, 100 test images) or
without ``--quick`` (the paper's 50 epochs, 1,000 test images). The model is the architecture-exact
BiomedCLIP built from the shared configs (``CALIBPROMPT_DATA``, default ``../shared/data``) with random
weights and a stand-in 30,522-entry WordPiece vocabulary (not PubMedBERT's; timing does not depend on
weight values or token ids). ``--model-dir`` benchmarks another open_clip hub-format folder instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP worker threads that spin while they wait make every small operation crawl when the cores are
# shared with other processes (measured at load 4 on 2 cores: a 20-token text step 3.0 s spinning,
# 0.5 s sleeping; encoder throughput unchanged). Both paths run under the same policy. It must be set
# before torch loads OpenMP; an OMP_WAIT_POLICY already in the environment wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CLASSES = ("covid", "normal")  # COVID (K = 2), the BiomedCLIP dataset of the paper
VOCAB_WORDS = ("x", "covid", "normal", "chest", "ray", "image", "patient", "of", "a")
# (alpha, lambda_AS) sweep; the first is the paper's BiomedCLIP setting (docs/method.md, "hyper-parameters").
ALPHAS = (0.1, 0.2, 0.05, 0.3, 0.0)
LAMBDAS = (3.0, 1.0, 0.3, 10.0)
ENCODE_BATCH = 32  # FeatureCache's default encoding batch
METRIC_KEYS_SKIP = {"convention", "n_bins", "closed", "n_samples", "n_classes"}


# ---------------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------------
def sweep_configs(n: int) -> list[tuple[float, float]]:
    """``n`` (alpha, lambda) pairs: every alpha with lambda 3 or 1 (alternating), then the other of the
    two, then more lambdas. The first is the paper's BiomedCLIP setting (0.1, 3)."""
    pairs = [(a, LAMBDAS[i % 2]) for i, a in enumerate(ALPHAS)]
    pairs += [(a, LAMBDAS[(i + 1) % 2]) for i, a in enumerate(ALPHAS)]
    for lam in LAMBDAS[2:]:
        pairs += [(a, lam) for a in ALPHAS]
    k = 0
    while len(pairs) < n:  # beyond 20 configurations: more lambdas
        k += 1
        pairs += [(a, round(0.15 * k, 4)) for a in ALPHAS if (a, round(0.15 * k, 4)) not in pairs]
    return pairs[:n]


def objective_for(alpha: float, lam: float):
    from calibprompt.losses import build_objective

    return build_objective([{"name": "LS", "alpha": alpha}, {"name": "SMAC", "alpha": alpha},
                            {"name": "AS", "weight": lam}])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock timer that synchronises the accelerator at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory (and CUDA allocator peak) during a block.

    Linux: the RSS high-water mark is reset through /proc/self/clear_refs, so each block gets its own
    peak; elsewhere ru_maxrss (a process-lifetime peak) is reported and ``resettable`` is False."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = _status_kb("VmHWM") is not None
        except OSError:
            self.resettable = False
        self.start_mb = (_status_kb("VmRSS") or 0) / 1024
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM") if self.resettable else None
        self.peak_mb = (hwm / 1024) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def as_dict(self) -> dict:
        out = {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
               "rss_peak_over_start_mb": round(self.peak_mb - self.start_mb, 1),
               "peak_is_per_phase": self.resettable}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_allocated_mb"] = round(self.cuda_peak_mb, 1)
        return out


class EncoderRecorder:
    """Wraps ``backbone.encode_image`` to record the batch sizes (and time) the engine encodes."""

    def __init__(self, backbone, device):
        self.backbone, self.device = backbone, device
        self.batches: list[int] = []
        self.seconds = 0.0

    def __enter__(self):
        original = type(self.backbone).encode_image.__get__(self.backbone)

        def recorded(images):
            sync(self.device)
            t = time.perf_counter()
            out = original(images)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            self.batches.append(int(images.shape[0]))
            return out

        self.backbone.encode_image = recorded
        return self

    def __exit__(self, *exc):
        del self.backbone.encode_image


def metric_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the numeric metrics both dicts hold (NaN = NaN counts as 0)."""
    worst = 0.0
    for key, va in a.items():
        if key in METRIC_KEYS_SKIP or key not in b:
            continue
        vb = b[key]
        if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)) or isinstance(va, bool):
            continue
        if math.isnan(va) and math.isnan(vb):
            continue
        worst = max(worst, abs(float(va) - float(vb)) if not (math.isnan(va) or math.isnan(vb)) else math.inf)
    return worst


def compute_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    from calibprompt.metrics import calibration_metrics

    return calibration_metrics(logits.detach().double().cpu().numpy(), labels)


# ---------------------------------------------------------------------------------------------------
# model and data
# ---------------------------------------------------------------------------------------------------
def build_biomedclip(workdir: Path):
    """Architecture-exact BiomedCLIP (ViT-B/16 + PubMedBERT, CLS pooling, MLP projection), random
    weights, stand-in 30,522-entry WordPiece vocabulary (NOT PubMedBERT's), built in memory."""
    from calibprompt.backbones.open_clip_model import OpenClipBackbone, build_open_clip
    from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
    from calibprompt.backbones.random_init import write_bert_text_dir
    from calibprompt.settings import shared_file

    clip_cfg = json.loads(shared_file("configs/biomedclip/open_clip_config.json").read_text())
    bert_cfg = shared_file("configs/pubmedbert/config.json")
    text_dir = write_bert_text_dir(workdir / "pubmedbert-standin", bert_cfg, words=VOCAB_WORDS)
    model_cfg = clip_cfg["model_cfg"]
    torch.manual_seed(0)
    model = build_open_clip(model_cfg, str(text_dir))
    pre = clip_cfg.get("preprocess_cfg", {})
    preprocess = Preprocess(image_size=int(model_cfg["vision_cfg"].get("image_size", 224)),
                            mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)))
    return OpenClipBackbone(model, model_cfg, preprocess, "biomedclip-arch-random", text_dir=str(text_dir))


def embed_on_model_device(backbone) -> None:
    """``PromptLearner`` embeds the token ids it tokenised (on the CPU) with the backbone's embedding
    table; on an accelerator the ids must move to the table's device first. Done here for the
    benchmark (harmless where the backbone already does it)."""
    device = next(backbone.parameters()).device
    if device.type == "cpu":
        return
    original = type(backbone).embed_tokens.__get__(backbone)
    backbone.embed_tokens = lambda ids: original(ids.to(device))


def load_model_dir(model_dir: str, text_dir: str | None):
    from calibprompt.backbones.open_clip_model import OpenClipBackbone

    return OpenClipBackbone.from_dir(model_dir, text_dir=text_dir, allow_random=True)


def write_synthetic_images(root: Path, n_train_per_class: int, n_test: int, size: int = 224,
                           seed: int = 0) -> Path:
    """``root/{train,test}/<class>/*.png``: smooth RGB images with class-dependent structure and noise
    (X-ray-like content, so PNG decoding costs what it costs for real images of this size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    from PIL import Image

    counts = {"train": [n_train_per_class] * len(CLASSES),
              "test": [n_test // len(CLASSES) + (1 if k < n_test % len(CLASSES) else 0) for k in range(len(CLASSES))]}
    for split, per_class in counts.items():
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[k]):
                cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
                blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
                base = 0.35 + 0.3 * yy + (0.25 if k == 0 else -0.1) * blob
                img = np.clip(base[..., None] * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{name}_{i:04d}.png")
    return root


def open_bench_dataset(root: Path):
    from calibprompt.data import open_dataset

    return open_dataset({"source": "folder", "path": str(root), "name": "synthetic-covid"})


# ---------------------------------------------------------------------------------------------------
# the reference loop (official-code style)
# ---------------------------------------------------------------------------------------------------
class ReferencePrompt(torch.nn.Module):
    """CoOp prompt learner as the official code builds it: 16 shared context vectors spliced into the
    prompts tokenised to the model's full context length (256 for BiomedCLIP), never trimmed."""

    def __init__(self, backbone, classnames, n_ctx: int, seed: int, init_std: float = 0.02):
        super().__init__()
        dim = backbone.info.token_dim
        dtype = next(backbone.parameters()).dtype
        ctx = torch.randn((n_ctx, dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        self.ctx = torch.nn.Parameter((ctx * init_std).to(dtype))
        prompts = [" ".join(["X"] * n_ctx) + " " + c.replace("_", " ") + "." for c in classnames]
        ids = backbone.tokenize(prompts).to(next(backbone.parameters()).device)  # full length, padded
        with torch.no_grad():
            emb = backbone.embed_tokens(ids).to(dtype)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)

    def text_features(self, backbone) -> torch.Tensor:
        k = self.ids.shape[0]
        emb = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(k, -1, -1), self.suffix], dim=1)
        return F.normalize(backbone.encode_embeddings(emb, self.ids).float(), dim=-1)


@dataclass
class PathStats:
    seconds: float = 0.0
    images_encoded: int = 0
    text_tokens: int = 0
    steps: int = 0
    per_config_seconds: list[float] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    prompt_length: int = 0


def run_reference(backbone, dataset, train_s, test_s, alpha, lam, settings, seed, *, augment: bool,
                  n_views: int, aug_seed: int, n_ctx: int, device, stats: PathStats,
                  test_batch: int = 100) -> tuple[dict, torch.Tensor]:
    """One configuration, official-code style. Returns (metrics, test logits)."""
    from calibprompt.features.cache import FeatureCache, _apply
    from calibprompt.methods.prompt_training import class_logits, make_optimizer, view_schedule

    objective = objective_for(alpha, lam)
    prompt = ReferencePrompt(backbone, dataset.classnames, n_ctx, seed).to(device)
    optimizer = make_optimizer([prompt.ctx], settings)
    scale = backbone.logit_scale.to(device).float()
    test_tf, train_tf = backbone.image_transform(False), backbone.image_transform(True)
    weights = backbone.fingerprint()
    train_desc = backbone.preprocess.describe(True)
    generator = torch.Generator().manual_seed(seed)
    n = len(train_s)
    schedule = view_schedule(n, n_views if augment else 1, settings.epochs, generator)
    labels = torch.tensor([s.label for s in train_s], device=device)
    drop_last = settings.drop_last and n >= settings.batch_size
    stop = n - n % settings.batch_size if drop_last else n
    tokens = int(prompt.ids.numel())

    def pixels(samples, views=None):
        if views is None:
            return torch.stack([test_tf(dataset.load(s)) for s in samples])
        # on-the-fly augmentation; each (image, view) crop is seeded as the engine's view bank seeds it
        return torch.stack([_apply(train_tf, dataset.load(s),
                                   FeatureCache.key(weights, train_desc, dataset.content_hash(s), int(v), aug_seed))
                            for s, v in zip(samples, views)])

    dtype = next(backbone.parameters()).dtype
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(epoch)
        order = torch.randperm(n, generator=generator)
        for begin in range(0, stop, settings.batch_size):
            idx = order[begin: begin + settings.batch_size]
            batch = [train_s[i] for i in idx.tolist()]
            x = pixels(batch, schedule[epoch, idx].tolist() if augment else None)
            with torch.no_grad():
                feats = backbone.encode_image(x.to(device=device, dtype=dtype)).float()
            text = prompt.text_features(backbone)
            loss = objective(class_logits(feats, text, scale), labels[idx.to(device)], text)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.images_encoded += len(batch)
            stats.text_tokens += tokens
            stats.steps += 1
    # evaluation: the whole test set re-encoded, text features recomputed per batch (CustomCLIP.forward)
    out = []
    with torch.no_grad():
        for begin in range(0, len(test_s), test_batch):
            batch = test_s[begin: begin + test_batch]
            feats = backbone.encode_image(pixels(batch).to(device=device, dtype=dtype)).float()
            text = prompt.text_features(backbone)
            out.append(class_logits(feats, text, scale))
            stats.images_encoded += len(batch)
            stats.text_tokens += tokens
    logits = torch.cat(out).cpu()
    return compute_metrics(logits, np.array([s.label for s in test_s])), logits


# ---------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``--device`` as ``calibprompt run`` resolves ``device:``; an unavailable CUDA ends the script."""
    from calibprompt.engine.pipeline import resolve_device as run_device

    try:
        return run_device(name)
    except ValueError:
        raise SystemExit(f"bench_engine: --device {name} requested but CUDA is not available; "
                         "use --device cpu or auto") from None


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the result dict."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_benchmark(args, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_benchmark(args: argparse.Namespace, log=print) -> dict:
    from calibprompt.features import FeatureCache
    from calibprompt.methods.prompt_training import TrainSettings

    device = resolve_device(args.device)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="calibprompt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    configs = sweep_configs(args.configs)
    n_ref = min(args.ref_configs, len(configs))
    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size)
    n_views = args.epochs if args.augment else 1
    load_start = load_average()
    t_all = time.perf_counter()
    try:
        # ---- setup (shared by both paths, not timed in either) --------------------------------
        with Clock(device) as t_model:
            backbone = (load_model_dir(args.model_dir, args.text_dir) if args.model_dir
                        else build_biomedclip(workdir)).to(device)
        embed_on_model_device(backbone)
        n_params = sum(p.numel() for p in backbone.parameters())
        log(f"model: {backbone.info.name}, {n_params / 1e6:.1f} M parameters, built in {t_model.seconds:.1f} s "
            f"on {device} ({torch.get_num_threads()} CPU threads)")
        with Clock(device) as t_data:
            image_root = write_synthetic_images(workdir / "images", args.shots, args.n_test, args.image_size)
            dataset = open_bench_dataset(image_root)
        train_s, test_s = dataset.samples_in("train"), dataset.samples_in("test")
        log(f"data: {len(train_s)} train ({args.shots} shots x {len(dataset.classnames)} classes), "
            f"{len(test_s)} test synthetic {args.image_size}x{args.image_size} PNGs, written and opened "
            f"(verified) in {t_data.seconds:.1f} s")
        backbone.fingerprint()  # the cache key's weights hash, computed once per model (shared setup)
        # warm-up: first calls allocate kernels/workspaces; give both paths the same warm start
        with torch.no_grad():
            size = backbone.preprocess.image_size
            backbone.encode_image(torch.randn(2, 3, size, size, device=device,
                                              dtype=next(backbone.parameters()).dtype))
        ReferencePrompt(backbone, dataset.classnames, args.n_ctx, 0).to(device).text_features(backbone).sum().backward()
        sync(device)

        # ---- engine, sequential (the run path) ------------------------------------------------
        cache = FeatureCache(workdir / "cache")
        seq = PathStats()
        log(f"engine (sequential): {len(configs)} configurations ...")
        with PeakMemory(device) as mem, EncoderRecorder(backbone, device) as rec:
            seq_metrics, seq_logits, encode_first = run_engine_sequential(
                backbone, dataset, train_s, test_s, configs, settings, args.seed, cache, augment=args.augment,
                n_views=n_views, aug_seed=args.aug_seed, n_ctx=args.n_ctx, device=device, stats=seq)
        seq.memory = mem.as_dict()
        log(f"  {seq.seconds:.1f} s (first configuration, cold cache: {seq.per_config_seconds[0]:.1f} s, "
            f"of which encoding {encode_first:.1f} s); {seq.images_encoded} images encoded")

        # ---- isolation timings -----------------------------------------------------------------
        steps_per_epoch = (len(train_s) // args.batch_size if len(train_s) >= args.batch_size
                           else math.ceil(len(train_s) / args.batch_size))
        log("isolated encoder/text timings ...")
        iso = time_isolated(backbone, dataset, seq.images_encoded, ENCODE_BATCH, seq.steps,
                            args.epochs * steps_per_epoch, len(configs), args.n_ctx, device,
                            image_batches=args.iso_image_batches)

        # ---- engine, batched -------------------------------------------------------------------
        bat = PathStats()
        bat_metrics = bat_logits = None
        if not args.no_batched:
            log("engine (batched multi-configuration) ...")
            with PeakMemory(device) as mem:
                bat_metrics, bat_logits = run_engine_batched(
                    backbone, dataset, train_s, test_s, configs, settings, args.seed, cache, augment=args.augment,
                    n_views=n_views, aug_seed=args.aug_seed, n_ctx=args.n_ctx, device=device, stats=bat,
                    max_prompts=args.max_prompts)
            bat.memory = mem.as_dict()
            log(f"  {bat.seconds:.1f} s warm + {encode_first:.1f} s cold encoding")

        # ---- persistent cache shared by a grid: a second process starts warm from disk ------------
        with Clock(device) as t_disk:
            disk = FeatureCache(workdir / "cache")
            engine_features(disk, backbone, dataset, train_s, test_s, augment=args.augment, n_views=n_views,
                            aug_seed=args.aug_seed, device=device)

        # ---- reference -------------------------------------------------------------------------
        ref = PathStats()
        ref_metrics, ref_logits = [], []
        with PeakMemory(device) as mem:
            for c in range(n_ref):
                log(f"reference configuration {c + 1}/{n_ref} (alpha={configs[c][0]}, lambda={configs[c][1]}) ...")
                with Clock(device) as clock:
                    m, lg = run_reference(backbone, dataset, train_s, test_s, *configs[c], settings, args.seed,
                                          augment=args.augment, n_views=n_views, aug_seed=args.aug_seed,
                                          n_ctx=args.n_ctx, device=device, stats=ref)
                ref.per_config_seconds.append(clock.seconds)
                ref_metrics.append(m)
                ref_logits.append(lg)
                log(f"  {clock.seconds:.1f} s")
        ref.memory = mem.as_dict()
        ref.seconds = sum(ref.per_config_seconds)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    # ---- comparison and report ----------------------------------------------------------------------
    n_cfg = len(configs)
    ref_per_config = ref.seconds / n_ref
    ref_sweep = ref_per_config * n_cfg
    diffs_seq = [metric_diff(ref_metrics[c], seq_metrics[c]) for c in range(n_ref)]
    logit_seq = [float((ref_logits[c] - seq_logits[c]).abs().max()) for c in range(n_ref)]
    diffs_bat = [metric_diff(ref_metrics[c], bat_metrics[c]) for c in range(n_ref)] if bat_metrics else []
    logit_bat = [float((ref_logits[c] - bat_logits[c]).abs().max()) for c in range(n_ref)] if bat_logits else []
    engine_single = seq.per_config_seconds[0]
    engine_sweep = seq.seconds
    out = {
        "mode": "quick" if args.quick else ("default" if args.default_sizes else "custom"),
        "device": str(device),
        "model": backbone.info.name,
        "model_parameters": n_params,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "epochs": args.epochs, "shots": args.shots, "n_train": len(train_s), "n_test": len(test_s),
        "classes": len(dataset.classnames), "batch_size": args.batch_size, "augment": bool(args.augment),
        "configs": [list(c) for c in configs], "reference_configs_timed": n_ref,
        "reference_context_length": backbone.info.context_length,
        "engine_prompt_length": seq.prompt_length,
        # headline numbers
        "single_speedup": ref_per_config / engine_single,
        "sweep_speedup": ref_sweep / engine_sweep,
        "overhead_ratio": engine_sweep / iso["unavoidable_sequential"],
        "max_metric_diff": max(diffs_seq + diffs_bat),
        "max_metric_diff_sequential": max(diffs_seq),
        "max_metric_diff_batched": max(diffs_bat) if diffs_bat else None,
        "max_logit_diff": max(logit_seq + logit_bat),
        # times
        "reference_seconds_per_config": ref.per_config_seconds,
        "reference_sweep_seconds_extrapolated": ref_sweep,
        "engine_single_seconds": engine_single,
        "engine_sweep_seconds": engine_sweep,
        "engine_per_config_seconds": seq.per_config_seconds,
        "engine_cold_encoding_seconds": encode_first,
        "engine_encoder_seconds_inside": rec.seconds,
        "engine_encoder_rows": int(sum(rec.batches)),  # incl. the cache's zero padding of partial batches
        "warm_disk_cache_seconds": t_disk.seconds,
        "warm_disk_cache_images_encoded": disk.encoded,
        "isolated": iso,
        # work counts (reference extrapolated to the sweep)
        "reference_images_encoded_per_config": ref.images_encoded // n_ref,
        "reference_images_encoded_sweep": ref.images_encoded // n_ref * n_cfg,
        "engine_images_encoded": seq.images_encoded,
        "reference_text_tokens_per_config": ref.text_tokens // n_ref,
        "reference_text_tokens_sweep": ref.text_tokens // n_ref * n_cfg,
        "engine_text_tokens": seq.text_tokens,
        "memory": {"reference": ref.memory, "engine_sequential": seq.memory},
        "metrics_reference": ref_metrics,
        "metrics_engine": seq_metrics[:n_ref],
        "load_average_start": load_start, "load_average_end": load_average(),
        "total_seconds": time.perf_counter() - t_all,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "platform": platform.platform()},
    }
    if bat_metrics is not None:
        bat_sweep = encode_first + bat.seconds
        out.update({
            "engine_batched_sweep_seconds": bat_sweep,
            "engine_batched_warm_seconds": bat.seconds,
            "sweep_speedup_batched": ref_sweep / bat_sweep,
            "overhead_ratio_batched": bat_sweep / iso["unavoidable_batched"],
            "batched_vs_sequential_training": (engine_sweep - encode_first) / bat.seconds,
            "engine_batched_text_tokens": bat.text_tokens,
        })
        out["memory"]["engine_batched"] = bat.memory
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    report(out, log)
    return out


def report(r: dict, log=print) -> None:
    n = len(r["configs"])
    iso = r["isolated"]
    log("")
    log(f"=== engine benchmark ({r['mode']}): {r['model']} on {r['device']}, {r['threads']} threads, "
        f"K={r['classes']}, {r['shots']} shots, batch {r['batch_size']}, {r['epochs']} epochs, "
        f"{r['n_test']} test images, {n} configurations, augmentation {'on' if r['augment'] else 'off'}")
    log(f"load average at start {r['load_average_start']}, at end {r['load_average_end']}; "
        f"OMP_WAIT_POLICY={r['omp_wait_policy']}")
    log(f"reference: timed on {r['reference_configs_timed']} configuration(s) "
        f"({', '.join(f'{s:.1f}' for s in r['reference_seconds_per_config'])} s); the sweep figure is their "
        f"mean x {n} (the reference shares nothing between configurations)")
    ref_sweep = r["reference_sweep_seconds_extrapolated"]
    mem = r["memory"]
    rows = [
        ("", "reference", "engine"),
        ("single configuration [s]", f"{ref_sweep / n:.1f}", f"{r['engine_single_seconds']:.1f}"),
        (f"sweep of {n} [s]", f"{ref_sweep:.1f} (extrapolated)", f"{r['engine_sweep_seconds']:.1f}"),
        ("images encoded (sweep)", f"{r['reference_images_encoded_sweep']}",
         f"{r['engine_images_encoded']} ({r['engine_encoder_rows']} rows)"),
        ("text tokens processed (sweep)", f"{r['reference_text_tokens_sweep']}", f"{r['engine_text_tokens']}"),
        ("text sequence length", f"{r['reference_context_length']}", f"{r['engine_prompt_length']}"),
        ("peak RSS [MB]", f"{mem['reference']['rss_peak_mb']:.0f}", f"{mem['engine_sequential']['rss_peak_mb']:.0f}"),
    ]
    if "cuda_peak_allocated_mb" in mem["reference"]:
        rows.append(("peak CUDA allocated [MB]", f"{mem['reference']['cuda_peak_allocated_mb']:.0f}",
                     f"{mem['engine_sequential']['cuda_peak_allocated_mb']:.0f}"))
    width = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        log(f"  {a:<{width}}  {b:>22}  {c:>12}")
    log(f"single_speedup  {r['single_speedup']:.2f}x")
    log(f"sweep_speedup   {r['sweep_speedup']:.2f}x")
    log(f"overhead_ratio  {r['overhead_ratio']:.3f}  (engine {r['engine_sweep_seconds']:.1f} s / unavoidable "
        f"{iso['unavoidable_sequential']:.1f} s = {iso['images']} images through the encoder "
        f"{iso['image_seconds']:.1f} s ({iso['image_seconds_per_image']:.3f} s/image) + "
        f"{iso['text_steps']} text steps x {iso['text_step_seconds']:.3f} s + "
        f"{n} eval passes x {iso['text_eval_seconds']:.3f} s, each timed in isolation)")
    if "sweep_speedup_batched" in r:
        log(f"batched multi-configuration engine: sweep {r['engine_batched_sweep_seconds']:.1f} s "
            f"({r['engine_cold_encoding_seconds']:.1f} s cold encoding + {r['engine_batched_warm_seconds']:.1f} s), "
            f"sweep_speedup {r['sweep_speedup_batched']:.2f}x, overhead_ratio {r['overhead_ratio_batched']:.3f} "
            f"({iso['batched_steps']} steps x {iso['batched_step_seconds']:.3f} s isolated); training "
            f"{r['batched_vs_sequential_training']:.2f}x faster than sequential")
    log(f"persistent cache: a second process reads every feature from disk in {r['warm_disk_cache_seconds']:.2f} s "
        f"({r['warm_disk_cache_images_encoded']} images encoded)")
    ok = r["max_metric_diff"] <= 1e-4
    log(f"metric equality (engine vs reference, {r['reference_configs_timed']} configuration(s)): "
        f"max |diff| = {r['max_metric_diff']:.2e} (sequential {r['max_metric_diff_sequential']:.2e}"
        + (f", batched {r['max_metric_diff_batched']:.2e}" if r.get("max_metric_diff_batched") is not None else "")
        + f"), max |logit diff| = {r['max_logit_diff']:.2e} -> {'OK' if ok else 'FAIL'} (tolerance 1e-4)")
    log(f"total {r['total_seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------------
# memory probe: peak RSS while streaming N test images through the feature cache (own process each)
# ---------------------------------------------------------------------------------------------------
def memory_probe_one(args: argparse.Namespace) -> dict:
    from calibprompt.features import FeatureCache

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    backbone = (load_model_dir(args.model_dir, args.text_dir) if args.model_dir
                else build_biomedclip(workdir / f"probe-{args.probe_one}")).to(device)
    dataset = open_bench_dataset(workdir / "images")
    test_s = dataset.samples_in("test")[: args.probe_one]
    backbone.fingerprint()
    with PeakMemory(device) as mem, Clock(device) as clock:
        cache = FeatureCache(workdir / f"probe-cache-{args.probe_one}-{os.getpid()}")
        feats = cache.features(backbone, dataset, test_s)
    after = (_status_kb("VmRSS") or 0) / 1024
    return {"n_test": len(test_s), "seconds": clock.seconds, **mem.as_dict(),
            "rss_after_over_start_mb": round(after - mem.start_mb, 1),
            "allocator": os.environ.get("MALLOC_MMAP_THRESHOLD_") and
            f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}" or "glibc default",
            "feature_matrix_mb": feats.numel() * feats.element_size() / 2**20,
            "pixels_if_not_streamed_mb": len(test_s) * 3 * backbone.preprocess.image_size ** 2 * 4 / 2**20}


ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_probe(args: argparse.Namespace, log=print) -> dict:
    """Each size in its own process, with glibc's default allocator settings and, with
    ``--compare-allocators``, again with a fixed mmap threshold (large blocks always mapped and unmapped,
    so resident memory follows live data)."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="calibprompt-memprobe-"))
    sizes = sorted(args.memory_probe)
    try:
        write_synthetic_images(workdir / "images", args.shots, max(sizes), args.image_size)
        out: dict = {"load_average_start": load_average(), "allocators": {}}
        allocators = ALLOCATORS if args.compare_allocators else {"glibc default": {}}
        for name, env in allocators.items():
            rows = []
            for n in sizes:
                cmd = [sys.executable, os.path.abspath(__file__), "--probe-one", str(n), "--workdir", str(workdir),
                       "--device", args.device, "--image-size", str(args.image_size)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.model_dir:
                    cmd += ["--model-dir", args.model_dir] + (["--text-dir", args.text_dir] if args.text_dir else [])
                child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                log(f"[{name}] {n:>5} test images: peak RSS {row['rss_peak_mb']:.0f} MB = {row['rss_start_mb']:.0f} MB "
                    f"before + {row['rss_peak_over_start_mb']:.0f} MB while encoding, "
                    f"{row['rss_after_over_start_mb']:.0f} MB held after ({row['seconds']:.0f} s); feature matrix "
                    f"{row['feature_matrix_mb']:.2f} MB; the pixels alone would be "
                    f"{row['pixels_if_not_streamed_mb']:.0f} MB if not streamed")
            growth = rows[-1]["rss_peak_over_start_mb"] - rows[0]["rss_peak_over_start_mb"]
            held = rows[-1]["rss_after_over_start_mb"] - rows[0]["rss_after_over_start_mb"]
            feat_growth = rows[-1]["feature_matrix_mb"] - rows[0]["feature_matrix_mb"]
            log(f"[{name}] from {sizes[0]} to {sizes[-1]} images: encoding peak {growth:+.1f} MB, held after "
                f"{held:+.1f} MB (the feature matrix grows by {feat_growth:.2f} MB)")
            out["allocators"][name] = {"rows": rows, "peak_growth_mb": growth, "held_growth_mb": held,
                                       "feature_matrix_growth_mb": feat_growth}
        out["load_average_end"] = load_average()
        return out
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 epochs, 100 test images, 10 configurations")
    p.add_argument("--epochs", type=int, help="default 50 (quick 10)")
    p.add_argument("--n-test", type=int, help="test images; default 1000 (quick 100)")
    p.add_argument("--configs", type=int, default=10, help="engine configurations (alpha, lambda pairs)")
    p.add_argument("--ref-configs", type=int,
                   help="configurations the reference is timed on (default 2; quick 1: it shares nothing "
                        "between configurations, so each costs the same)")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--augment", action="store_true",
                   help="paper augmentation (random resized crop + flip, a fresh view per epoch); the reference "
                        "draws the same views on the fly, so equality still holds")
    p.add_argument("--aug-seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--image-size", type=int, default=224, help="side of the synthetic PNGs")
    p.add_argument("--model-dir", help="open_clip hub-format folder to benchmark instead of BiomedCLIP")
    p.add_argument("--text-dir", help="BERT text folder for --model-dir")
    p.add_argument("--max-prompts", type=int, help="batched engine: sequences per text-encoder pass")
    p.add_argument("--no-batched", action="store_true", help="skip the batched multi-configuration engine")
    p.add_argument("--batched", action="store_true",
                   help="run the batched multi-configuration engine in --quick mode too (default: only without --quick)")
    p.add_argument("--iso-image-batches", type=int,
                   help="isolated encoder batches timed for the unavoidable image cost (quick 1, default 4)")
    p.add_argument("--memory-probe", type=int, nargs="+", metavar="N",
                   help="only measure peak RSS while streaming N test images through the cache (e.g. 250 1000)")
    p.add_argument("--compare-allocators", action="store_true",
                   help="memory probe: also run each size with a fixed glibc mmap threshold")
    p.add_argument("--probe-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help="keep images/cache here (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.default_sizes = not args.quick and args.epochs is None and args.n_test is None
    if args.epochs is None:
        args.epochs = 10 if args.quick else 50
    if args.n_test is None:
        args.n_test = 100 if args.quick else 1000
    # --quick must fit in 4 minutes on 2 cores: the reference is timed on one configuration, the encoder
    # in isolation on one batch, and the batched engine (not a target) only on request.
    if args.iso_image_batches is None:
        args.iso_image_batches = 1 if args.quick else (4 if args.default_sizes else 2)
    if args.ref_configs is None:
        args.ref_configs = 1 if args.quick else 2
    if args.quick and not args.batched:
        args.no_batched = True
    if min(args.epochs, args.n_test, args.configs, args.ref_configs, args.shots, args.batch_size) < 1:
        p.error("epochs, n-test, configs, ref-configs, shots and batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_one:
        print(json.dumps(memory_probe_one(args)))
        return 0
    if not args.model_dir:
        from calibprompt.settings import DATA_ENV, data_dir

        missing = [f for f in ("configs/biomedclip/open_clip_config.json", "configs/pubmedbert/config.json")
                   if not (data_dir() / f).is_file()]
        if missing:
            print(f"bench_engine: shared config file(s) {', '.join(str(data_dir() / f) for f in missing)} not found. "
                  f"Set {DATA_ENV} to the shared data folder (default ../shared/data, relative to the current "
                  "directory), or pass --model-dir.", file=sys.stderr)
            return 2
    result = memory_probe(args) if args.memory_probe else run_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    if not args.memory_probe and result["max_metric_diff"] > 1e-4:
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
