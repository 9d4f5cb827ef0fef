"""Zero-shot: the frozen backbone with the dataset's hand-written template, nothing learned."""

from __future__ import annotations

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.heads import LinearHead


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    family = "zero-shot"
    formula = "z_k = s · cos(f, t_k), t_k = TextTower(template.format(class k)); nothing is trained"
    reference = "Radford et al., CLIP (ICML 2021)"
    trains = False
    takes_losses = False
    train_views = "none"

    def fit(self, ctx: FitContext) -> FitResult:
        return FitResult(LinearHead(ctx.zs_text, scale=ctx.scale, normalize_weight=False))
