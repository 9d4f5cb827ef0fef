"""Tip-Adapter (training-free) and Tip-Adapter-F (cache keys fine-tuned).

    z = s · f̂ Tᵀ + α · exp(−β (1 − f̂ K̂ᵀ)) L

K: the support features (the mean over each shot's cached views, L2-normalised), L: their one-hot
labels, T: zero-shot text features, s: the backbone's logit scale (the original hard-codes 100, which
``scale: 100`` reproduces). Recipe of Zhang et al., Tip-Adapter (ECCV 2022), public code ``main.py``:
α = β = 1 by default; with validation shots (``search: true``) β and α are chosen by validation
accuracy over ``[i (scale − 0.1) / steps + 0.1 for i in range(steps)]`` with search scales (7, 3) and
steps (200, 20) (its ImageNet config), the first strictly better pair winning, β outer and α inner.
Tip-Adapter-F trains the keys: AdamW lr 1e-3, eps 1e-4, weight decay 0.01, batch 256, 20 epochs,
cosine per iteration, then re-searches α and β. Deviations: the original keeps the epoch of best
*test* accuracy; here the last epoch is kept. Keys are re-normalised in every forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.feature_training import Recipe, pooled_support, train_head, val_accuracy
from calibprompt.methods.heads import TipAdapterHead, tip_cache_logits


def search_grid(scale: float, steps: int) -> list[float]:
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def search_alpha_beta(head: TipAdapterHead, feats: torch.Tensor, labels: torch.Tensor,
                      scales: tuple[float, float], steps: tuple[int, int]) -> tuple[float, float, float]:
    """(alpha, beta, val accuracy) of the original's grid search on validation features."""
    clip = head.scale * F.normalize(feats.float(), dim=-1) @ head.text.t()
    best = (head.alpha, head.beta, -1.0)
    for beta in search_grid(scales[0], steps[0]):
        cache = tip_cache_logits(feats, head.keys, head.values, beta)
        for alpha in search_grid(scales[1], steps[1]):
            acc = val_accuracy(clip + alpha * cache, labels)
            if acc > best[2]:
                best = (alpha, beta, acc)
    return best


@register_method
class TipAdapter(Method):
    name = "tip-adapter"
    family = "feature"
    formula = "z = s · f̂ Tᵀ + α · exp(−β(1 − f̂ K̂ᵀ)) L; cache of the support features, training-free"
    reference = "Zhang et al., Tip-Adapter (ECCV 2022)"
    trains = False
    takes_losses = False
    params = {"alpha": 1.0, "beta": 1.0, "scale": None, "search": True, "search_scale": [7.0, 3.0],
              "search_step": [200, 20]}

    def validate(self) -> None:
        self._number("alpha", 0)
        self._number("beta", 0)
        self._number("scale", 0, open_low=True, allow_none=True)
        for key in ("search_scale", "search_step"):
            value = self.hparams[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 2
                    and all(isinstance(x, (int, float)) and x > 0 for x in value)):
                raise ValueError(f"method '{self.name}': {key}={value!r} must be two positive numbers [beta, alpha]")

    def initial_head(self, ctx: FitContext) -> TipAdapterHead:
        keys = F.normalize(pooled_support(ctx), dim=-1).cpu()  # the head is built on CPU; run() moves it
        values = F.one_hot(ctx.labels.long(), ctx.num_classes).float().cpu()
        scale = ctx.scale if self.hparams["scale"] is None else float(self.hparams["scale"])
        return TipAdapterHead(ctx.zs_text.cpu(), keys, values, self.hparams["alpha"], self.hparams["beta"], scale)

    def searched(self, ctx: FitContext, head: TipAdapterHead, info: dict) -> TipAdapterHead:
        if not self.hparams["search"] or ctx.val_features is None:
            return head
        scales = tuple(float(x) for x in self.hparams["search_scale"])
        steps = tuple(int(x) for x in self.hparams["search_step"])
        alpha, beta, acc = search_alpha_beta(head, ctx.val_features.cpu(), ctx.val_labels.cpu(), scales, steps)
        info.update(alpha=alpha, beta=beta, val_accuracy=acc)
        return TipAdapterHead(head.text, head.keys, head.values, alpha, beta, head.scale)

    def fit(self, ctx: FitContext) -> FitResult:
        info: dict = {"n_train": int(len(ctx.labels))}
        return FitResult(self.searched(ctx, self.initial_head(ctx), info), info)


@register_method
class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    formula = "Tip-Adapter with the cache keys K fine-tuned on the loss list (AdamW, 20 epochs)"
    trains = True
    takes_losses = True
    loss_inputs = frozenset({"zs_logits", "zs_text_features"})
    params = {**TipAdapter.params, "epochs": 20, "lr": 1e-3, "batch_size": 256, "weight_decay": 0.01, "eps": 1e-4}

    def validate(self) -> None:
        super().validate()
        self._number("epochs", 1, integer=True)
        self._number("lr", 0, open_low=True)
        self._number("batch_size", 1, integer=True)

    def fit(self, ctx: FitContext) -> FitResult:
        head = self.initial_head(ctx)
        keys = head.keys.detach().clone().to(ctx.device).requires_grad_(True)
        text, values = head.text.to(ctx.device), head.values.to(ctx.device)

        def forward(f: torch.Tensor) -> torch.Tensor:
            clip = head.scale * F.normalize(f, dim=-1) @ text.t()
            return clip + head.alpha * tip_cache_logits(f, keys, values, head.beta)

        recipe = Recipe(epochs=int(self.hparams["epochs"]), lr=float(self.hparams["lr"]),
                        batch_size=int(self.hparams["batch_size"]), optimizer="adamw",
                        weight_decay=float(self.hparams["weight_decay"]), eps=float(self.hparams["eps"]),
                        schedule="step")
        info = train_head(ctx, [keys], forward, self.objective(), recipe)
        tuned = TipAdapterHead(head.text, keys.detach().cpu(), head.values, head.alpha, head.beta, head.scale)
        return FitResult(self.searched(ctx, tuned, info), info)
