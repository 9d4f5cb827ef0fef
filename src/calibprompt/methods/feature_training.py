"""The gradient loop shared by the feature-space methods (ZS-LP, CLAP, CLIP-Adapter, Tip-Adapter-F).

Each epoch draws one cached view per training image (a fresh view every epoch while the bank has one
per epoch, as the prompt learner does), shuffles, and steps through mini-batches (``drop_last`` when
the training set has at least a batch, as Dassl). The learning rate follows a constant warm-up, then a
cosine decay stepped once per epoch (``schedule: epoch``, CLAP's Dassl recipe) or once per iteration
(``schedule: step``, Tip-Adapter-F). The objective is any registry loss list; losses on text features
receive the head's prototypes, and zero-shot losses the frozen zero-shot logits of the same views.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from calibprompt.methods.base import FitContext
from calibprompt.methods.prompt_training import class_logits, view_schedule


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule of a feature-space method (each method's paper defaults)."""

    epochs: int
    lr: float
    batch_size: int = 256
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    schedule: str = "epoch"  # cosine stepped per "epoch" or per "step"


def _optimizer(params: list[torch.Tensor], r: Recipe) -> torch.optim.Optimizer:
    if r.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=r.lr, eps=r.eps, weight_decay=r.weight_decay)
    return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)


def _lr(r: Recipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    if epoch < r.warmup_epochs:
        return r.warmup_lr
    if r.schedule == "step":
        total = max((r.epochs - r.warmup_epochs) * steps_per_epoch, 1)
        done = (epoch - r.warmup_epochs) * steps_per_epoch + step
        return 0.5 * r.lr * (1 + math.cos(math.pi * done / total))
    return 0.5 * r.lr * (1 + math.cos(math.pi * (epoch - r.warmup_epochs) / max(r.epochs - r.warmup_epochs, 1)))


def train_head(ctx: FitContext, params: list[torch.Tensor], forward: Callable[[torch.Tensor], torch.Tensor],
               objective, recipe: Recipe, *, prototypes: Callable[[], torch.Tensor] | None = None,
               penalty: Callable[[], torch.Tensor] | None = None,
               after_epoch: Callable[[int], None] | None = None) -> dict:
    """Minimise ``objective(forward(f), y) + penalty()`` over ``params``; returns what the run records."""
    generator = ctx.generator(salt=1)
    views, labels = ctx.train_views.to(ctx.device).float(), ctx.labels.to(ctx.device)
    n = views.shape[0]
    schedule = view_schedule(n, views.shape[1], recipe.epochs, generator)
    drop_last = n >= recipe.batch_size
    stop = n - n % recipe.batch_size if drop_last else n
    steps_per_epoch = max(stop // recipe.batch_size + (0 if drop_last or stop % recipe.batch_size == 0 else 1), 1)
    needs = getattr(objective, "needs", frozenset())
    zs_text = ctx.zs_text.to(ctx.device).float()
    optimizer = _optimizer(params, recipe)
    losses: list[float] = []
    steps = 0
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=generator)
        epoch_losses = []
        for i, begin in enumerate(range(0, stop, recipe.batch_size)):
            for group in optimizer.param_groups:
                group["lr"] = _lr(recipe, epoch, i, steps_per_epoch)
            idx = order[begin : begin + recipe.batch_size]
            feats = views[idx.to(ctx.device), schedule[epoch, idx].to(ctx.device)]
            extra: dict = {}
            if needs & {"zs_logits", "zs_text_features"}:
                extra = {"zs_logits": class_logits(feats, zs_text, ctx.scale),
                         "zs_text_features": zs_text}
            text = prototypes() if prototypes is not None and "text_features" in needs else None
            loss = objective(forward(feats), labels[idx.to(ctx.device)], text, **extra)
            if penalty is not None:
                loss = loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
            steps += 1
        losses.append(sum(epoch_losses) / max(len(epoch_losses), 1))
        if after_epoch is not None:
            after_epoch(epoch)
    return {"steps": steps, "epoch_losses": losses, "seconds": time.perf_counter() - start,
            "n_train": int(n)}


def pooled_support(ctx: FitContext) -> torch.Tensor:
    """(N, D) support features: the mean over a shot's cached views (Tip-Adapter averages its 10
    augmented passes), not yet normalised."""
    return ctx.train_views.float().mean(dim=1)


def val_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())
