"""The reference loop: CoOp/Dassl-style training that encodes images every step (as the official code)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.engine_bench.harness import compute_metrics, objective_for

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


def _seeded(transform, image, seed: int) -> torch.Tensor:
    """torchvision's transform under the global RNG seeded with ``seed`` (the official code's way)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def run_reference(backbone, dataset, train_s, test_s, alpha, lam, settings, seed, *, augment: bool,
                  n_views: int, aug_seed: int, n_ctx: int, device, stats: PathStats,
                  test_batch: int = 100) -> tuple[dict, torch.Tensor]:
    """One configuration, official-code style. Returns (metrics, test logits)."""
    from calibprompt.features.cache import FeatureCache, view_seed
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
        return torch.stack([_seeded(train_tf, dataset.load(s),
                                    view_seed(FeatureCache.key(weights, train_desc, dataset.content_hash(s), int(v),
                                                               aug_seed)))
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
