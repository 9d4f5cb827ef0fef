"""LP++: a linear probe blended class-wise with the zero-shot text classifier.

    z = W f̂ + b + α ⊙ (f̂ Tᵀ)          (T: L2-normalised zero-shot class text features, no logit scale)

Recipe of Huang et al., LP++ (CVPR 2024), public code ``methods/linear_probe_p2.py``:
W starts at the per-class *sum* of the normalised training features, b at PyTorch's default uniform
init (seeded), α at one value for all classes, 250 · mean_{c,k} (class-mean of f̂ · t_k). W and b take
full-batch SGD steps (momentum 0.9) of size 4N / λ_max(FᵀF); α takes a plain gradient step of size
N / (4 max_k Σ_i (f̂_i · t_k)²) every 10 epochs, with its gradient never zeroed (so it sums every epoch
since the start), as the original does. 300 epochs. Every cached training view is a training sample. The saved head folds
α into the weights (W + diag(α) T): the same logits.

Model selection: the original keeps the epoch of best validation accuracy (ties: the later epoch);
here that happens when the run has validation shots, else the last epoch is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.feature_training import val_accuracy
from calibprompt.methods.heads import LinearHead


@register_method
class LPPlusPlus(Method):
    name = "lp++"
    family = "feature"
    loss_inputs = frozenset()
    formula = "z = W f̂ + b + α ⊙ (f̂ Tᵀ); W, b by SGD with Lipschitz step sizes, α every 10 epochs"
    reference = "Huang et al., LP++ (CVPR 2024)"
    params = {"epochs": 300, "alpha_every": 10, "alpha_scale": 250.0, "select": "val"}

    def validate(self) -> None:
        self._number("epochs", 1, integer=True)
        self._number("alpha_every", 1, integer=True)
        self._number("alpha_scale", 0)
        if self.hparams["select"] not in ("val", "last"):
            raise ValueError(f"method 'lp++': select={self.hparams['select']!r} is invalid; use 'val' or 'last'")

    def fit(self, ctx: FitContext) -> FitResult:
        n, v, d = ctx.train_views.shape
        x = F.normalize(ctx.train_views.reshape(n * v, d).float(), dim=-1).to(ctx.device)
        y = ctx.labels.repeat_interleave(v).to(ctx.device)
        t = ctx.zs_text.float().to(ctx.device)
        k = ctx.num_classes
        onehot = F.one_hot(y, k).float()
        text_logits = x @ t.t()
        w = (onehot.t() @ x).clone().requires_grad_(True)
        bound = 1.0 / math.sqrt(d)
        b = ((torch.rand(k, generator=ctx.generator(salt=2)) * 2 - 1) * bound).to(ctx.device).requires_grad_(True)
        class_mean = (onehot.t() @ text_logits) / onehot.sum(0).clamp(min=1).unsqueeze(1)
        alpha = torch.full((k,), float(self.hparams["alpha_scale"]) * float(class_mean.mean()), device=ctx.device,
                           requires_grad=True)
        m = x.shape[0]
        lr_w = 4 * m / float(torch.linalg.eigvalsh((x.t() @ x).double()).max())
        lr_alpha = m / (4 * float((text_logits ** 2).sum(0).max()))
        opt = torch.optim.SGD([w, b], lr=lr_w, momentum=0.9)
        objective = self.objective()
        use_val = self.hparams["select"] == "val" and ctx.val_features is not None
        xv = F.normalize(ctx.val_features.float(), dim=-1).to(ctx.device) if use_val else None
        best, best_acc, losses = None, -1.0, []
        for epoch in range(int(self.hparams["epochs"])):
            opt.zero_grad()
            loss = objective(x @ w.t() + b + alpha * text_logits, y)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if (epoch + 1) % int(self.hparams["alpha_every"]) == 0:
                with torch.no_grad():
                    alpha -= lr_alpha * alpha.grad  # never zeroed: the sum since epoch 0, as the original
            if use_val:
                with torch.no_grad():
                    acc = val_accuracy(xv @ w.t() + b + alpha * (xv @ t.t()), ctx.val_labels)
                if acc >= best_acc:
                    best_acc, best = acc, (w.detach().clone(), b.detach().clone(), alpha.detach().clone(), epoch)
        if best is None:
            best = (w.detach(), b.detach(), alpha.detach(), int(self.hparams["epochs"]) - 1)
        w_b, b_b, a_b, epoch = best
        head = LinearHead(w_b + a_b.unsqueeze(1) * t, b_b, scale=1.0, normalize_weight=False)
        info = {"epoch_losses": losses, "steps": len(losses), "selected_epoch": epoch, "lr_w": lr_w,
                "lr_alpha": lr_alpha, "n_train": int(n)}
        if use_val:
            info["val_accuracy"] = best_acc
        return FitResult(head, info)
