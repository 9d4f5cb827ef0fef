"""ZS-LP and CLAP: a linear probe on cosine logits, started at (and for CLAP held near) the zero-shot
class prototypes.

    z = s · cos(f, w_k)   (s: the backbone's logit scale; w_k starts at the zero-shot text feature t_k)
    ZS-LP:  min  mean_i L(z_i, y_i)
    CLAP:   min  mean_i L(z_i, y_i) + (1/K) Σ_k λ_k ||w_k − t_k||²

Recipe of Silva-Rodríguez et al., CLAP (CVPR 2024), public code ``trainers/adapters.py`` and its
``SGD_lr1e-1_B256_ep300`` config: SGD lr 0.1, momentum 0.9, no weight decay, 300 epochs, batch 256,
cosine decay per epoch after one warm-up epoch at 1e-5; the last epoch is kept (no validation).
Multipliers ``multipliers``: ``zero-shot`` (default) λ_k = mean zero-shot probability of class k on
its own training views; ``balanced`` λ_k = 1; ``corrected`` the zero-shot λ rescaled to sum to K;
``constant`` their mean. ``adaptive: true`` applies CLAP's augmented-Lagrangian (PHR) outer step after
every epoch: λ_k <- max(λ_k + ρ_k h_k, 0), ρ_k <- h_k with h_k = ||w_k − t_k||² (ρ starts at 0).
As in the original, t_k and the initial w_k are the text tower's *unnormalised* zero-shot features:
the forward pass normalises w, so the norm of t sets the effective step size on w's direction and the
scale of the penalty (normalising t first would make both about ||t||² times stronger).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.feature_training import Recipe, train_head
from calibprompt.methods.heads import LinearHead

MULTIPLIERS = ("zero-shot", "balanced", "corrected", "constant")
_RECIPE = {"epochs": 300, "lr": 0.1, "batch_size": 256, "momentum": 0.9, "weight_decay": 0.0,
           "warmup_epochs": 1, "warmup_lr": 1e-5}


class _CosineProbe(Method):
    family = "feature"
    has_prototypes = True
    loss_inputs = frozenset({"text_features", "zs_logits", "zs_text_features"})
    params = dict(_RECIPE)

    def validate(self) -> None:
        self._number("epochs", 1, integer=True)
        self._number("batch_size", 1, integer=True)
        self._number("lr", 0, open_low=True)
        self._number("warmup_epochs", 0, integer=True)

    def recipe(self) -> Recipe:
        return Recipe(**{k: self.hparams[k] for k in _RECIPE}, schedule="epoch")

    def penalty(self, ctx: FitContext, w: torch.Tensor, t: torch.Tensor):
        return None, None

    def fit(self, ctx: FitContext) -> FitResult:
        t = (ctx.zs_text if ctx.zs_text_raw is None else ctx.zs_text_raw).float().to(ctx.device)
        w = t.clone().requires_grad_(True)
        penalty, after_epoch = self.penalty(ctx, w, t)
        info = train_head(ctx, [w], lambda f: ctx.scale * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t(),
                          self.objective(), self.recipe(), prototypes=lambda: F.normalize(w, dim=-1),
                          penalty=penalty, after_epoch=after_epoch)
        return FitResult(LinearHead(w.detach(), scale=ctx.scale, normalize_weight=True), info)


@register_method
class ZSLinearProbe(_CosineProbe):
    name = "zs-lp"
    formula = "z = s · cos(f, w_k), w initialised at the zero-shot text features t_k; SGD on the loss list"
    reference = "Silva-Rodríguez et al., CLAP (CVPR 2024), ZS-LP baseline"


@register_method
class CLAP(_CosineProbe):
    name = "clap"
    formula = "ZS-LP + (1/K) Σ_k λ_k ||w_k − t_k||², λ_k = mean zero-shot probability of class k on its shots"
    reference = "Silva-Rodríguez et al., CLAP (CVPR 2024)"
    params = {**_RECIPE, "multipliers": "zero-shot", "adaptive": False}

    def validate(self) -> None:
        super().validate()
        if self.hparams["multipliers"] not in MULTIPLIERS:
            raise ValueError(f"method 'clap': multipliers={self.hparams['multipliers']!r} is invalid; valid: "
                             f"{', '.join(MULTIPLIERS)}")
        if not isinstance(self.hparams["adaptive"], bool):
            raise ValueError(f"method 'clap': adaptive={self.hparams['adaptive']!r} must be true or false")

    def multipliers(self, ctx: FitContext, t: torch.Tensor) -> torch.Tensor:
        """λ_k per ``multipliers`` (zero-shot probabilities use the normalised text features)."""
        t = F.normalize(t, dim=-1)
        k = ctx.num_classes
        if self.hparams["multipliers"] == "balanced":
            return torch.ones(k, device=t.device)
        n, v, d = ctx.train_views.shape
        feats = F.normalize(ctx.train_views.reshape(n * v, d).float().to(t.device), dim=-1)
        labels = ctx.labels.repeat_interleave(v).to(t.device)
        probs = torch.softmax(ctx.scale * feats @ t.t(), dim=1)
        onehot = F.one_hot(labels, k).float()
        lam = (onehot * probs).sum(0) / onehot.sum(0).clamp(min=1)
        if self.hparams["multipliers"] == "corrected":
            lam = lam * k / lam.sum()
        elif self.hparams["multipliers"] == "constant":
            lam = torch.full_like(lam, float(lam.mean()))
        return lam

    def penalty(self, ctx: FitContext, w: torch.Tensor, t: torch.Tensor):
        lam = self.multipliers(ctx, t)
        rho = torch.zeros_like(lam)

        def penalty() -> torch.Tensor:
            return (lam * ((w - t) ** 2).sum(dim=1)).mean()

        def outer_step(_epoch: int) -> None:
            nonlocal lam, rho
            if self.hparams["adaptive"]:
                with torch.no_grad():
                    h = ((w - t) ** 2).sum(dim=1)
                    lam, rho = (lam + rho * h).clamp(min=0), h
        return penalty, outer_step
