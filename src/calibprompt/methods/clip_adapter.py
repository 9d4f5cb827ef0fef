"""CLIP-Adapter: a residual bottleneck MLP on the frozen image feature.

    g = r · ReLU(ReLU(f Dᵀ) Uᵀ) + (1 − r) · f,    z = s · cos(g, t_k)

D: (d/4) x d and U: d x (d/4), no biases (Gao et al., CLIP-Adapter, IJCV 2024, public
``clip_adapter.py``); residual ratio r = 0.2; applied to the unnormalised feature. The official repository
gives no training settings; these follow the CLAP repository's CLIP-Adapter baseline: SGD lr 0.1,
momentum 0.9, 300 epochs, batch 256, cosine per epoch after one warm-up epoch at 1e-5. The MLP starts
at PyTorch's default (Kaiming-uniform) initialisation, seeded by the run seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.feature_training import Recipe, train_head
from calibprompt.methods.heads import ClipAdapterHead, residual_adapter


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(cols)  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in))
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


@register_method
class ClipAdapter(Method):
    name = "clip-adapter"
    family = "feature"
    formula = "g = r · MLP(f) + (1 − r) · f, z = s · cos(g, t_k); the bottleneck MLP (d → d/4 → d) is trained"
    reference = "Gao et al., CLIP-Adapter (IJCV 2024)"
    loss_inputs = frozenset({"zs_logits", "zs_text_features"})
    params = {"ratio": 0.2, "reduction": 4, "epochs": 300, "lr": 0.1, "batch_size": 256, "momentum": 0.9,
              "warmup_epochs": 1, "warmup_lr": 1e-5}

    def validate(self) -> None:
        self._number("ratio", 0, 1)
        self._number("reduction", 1, integer=True)
        self._number("epochs", 1, integer=True)
        self._number("lr", 0, open_low=True)
        self._number("batch_size", 1, integer=True)

    def fit(self, ctx: FitContext) -> FitResult:
        d = ctx.train_views.shape[-1]
        hidden = max(d // int(self.hparams["reduction"]), 1)
        gen = ctx.generator(salt=3)
        down = _kaiming_uniform(hidden, d, gen).to(ctx.device).requires_grad_(True)
        up = _kaiming_uniform(d, hidden, gen).to(ctx.device).requires_grad_(True)
        text = ctx.zs_text.float().to(ctx.device)
        ratio = float(self.hparams["ratio"])

        def forward(f: torch.Tensor) -> torch.Tensor:
            return ctx.scale * F.normalize(residual_adapter(f, down, up, ratio), dim=-1) @ text.t()

        recipe = Recipe(epochs=int(self.hparams["epochs"]), lr=float(self.hparams["lr"]),
                        batch_size=int(self.hparams["batch_size"]), momentum=float(self.hparams["momentum"]),
                        warmup_epochs=int(self.hparams["warmup_epochs"]), warmup_lr=float(self.hparams["warmup_lr"]))
        info = train_head(ctx, [down, up], forward, self.objective(), recipe)
        head = ClipAdapterHead(ctx.zs_text, down.detach().cpu(), up.detach().cpu(), ratio, ctx.scale)
        return FitResult(head, info)
