"""PromptSmooth's test-time step (zero-shot PromptSmooth, and its combination with few-shot prompts).

For each test image on its own: start from a prompt (the context vectors of a prompt-learning run, or
for zero-shot the words of the dataset's template, e.g. "A chest X-ray image of"), take ``steps``
AdamW steps (lr 5e-3 in the original) that minimise the entropy of the *average* class distribution
over ``copies`` noisy copies of the image,

    H( (1/T) sum_t softmax(s * cos(f(x + eps_t), t_k(P))) ),

then freeze the prompt for that image's certification. Only the context vectors change (both towers
stay frozen); the prompt and the optimiser start afresh for every image. The noisy copies are their
own noise stream, independent of the certification draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TTA_STREAM = "tta"  # the copies' own noise stream: they never reuse a certification or training draw


@dataclass(frozen=True)
class TTASettings:
    copies: int = 100  # the original's noisy copies per image
    steps: int = 1
    lr: float = 5e-3

    def check(self) -> None:
        for name in ("copies", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tta {name} must be a whole number >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"tta lr must be > 0, got {self.lr!r}")


def average_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean softmax over the rows of ``logits`` (T, K)."""
    p = torch.softmax(logits.float(), dim=-1).mean(dim=0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def tuned_text_features(backbone, learner, start: torch.Tensor, copies: torch.Tensor, scale: float,
                        settings: TTASettings) -> torch.Tensor:
    """(K, D) normalised class features after the test-time steps on one image's (T, D) noisy copies.

    The step updates a float32 copy of the context, cast to the backbone's dtype for each pass: AdamW's
    state in half precision underflows (eps 1e-8 is 0 in fp16) and turns small gradients into inf."""
    ctx = start.detach().float().clone().requires_grad_(True)  # a fresh prompt for every image
    optimizer = torch.optim.AdamW([ctx], lr=settings.lr)
    feats = F.normalize(copies.float(), dim=-1)
    dtype = learner.ctx.dtype
    for _ in range(settings.steps):
        text = learner.text_features(backbone, ctx.to(dtype))
        loss = average_entropy(scale * feats @ text.t())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return learner.text_features(backbone, ctx.to(dtype)).float()
