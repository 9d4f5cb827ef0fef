"""Linear probe: multinomial logistic regression on L2-normalised frozen image features.

    z = W f̂ + b,   (W, b) = argmin  mean_i L(z_i, y_i) + ρ ||W||²_F / (C · N)

with L the method's loss list (CE by default) and ρ = 1/2 for K > 2, ρ = 1 for K = 2. With CE this has
the minimiser of scikit-learn's ``LogisticRegression(C=C)`` (``C Σ_i CE_i + ½||w||²``; for K = 2 its
single binary vector w equals the difference of the two rows here, hence ρ = 1), so the probabilities
agree with scikit-learn's (tested to 1e-4). Solved by L-BFGS in float64 with strong-Wolfe line search.

C is chosen as in CoOp's linear-probe protocol (Zhou et al., IJCV 2022, ``lpclip/linear_probe.py``):
validation accuracy over C in {1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6} (ties: the larger C), then 8 steps
of a binary search on log10 C between 0.1 and 10 times the peak; the last step's winner is used.
Unlike CoOp's RN50 features, the features are L2-normalised (as the LP++ repository's copy of the
protocol does). Give ``C`` to skip the search; without it the run needs ``val_shots``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibprompt.methods.base import FitContext, FitResult, Method, register_method
from calibprompt.methods.feature_training import val_accuracy
from calibprompt.methods.heads import LinearHead

C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, objective,
                 max_iter: int = 1000, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(W, b, L-BFGS iterations) minimising ``objective(x Wᵀ + b, y) + ρ ||W||² / (C N)`` (float64)."""
    x = x.double()
    n, d = x.shape
    rho = 1.0 if num_classes == 2 else 0.5
    w = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    needs_text = "text_features" in getattr(objective, "needs", frozenset())
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        text = F.normalize(w, dim=-1) if needs_text else None
        loss = objective(x @ w.t() + b, y, text) + rho * (w * w).sum() / (c * n)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), int(opt.state[opt._params[0]].get("n_iter", 0))


@register_method
class LinearProbe(Method):
    name = "linear-probe"
    family = "feature"
    loss_inputs = frozenset({"text_features"})
    formula = "z = W f̂ + b; logistic regression with L2 penalty ||W||²/(2CN), C chosen on validation shots"
    reference = "Radford et al., CLIP (2021); protocol of Zhou et al., CoOp lpclip (IJCV 2022)"
    params = {"C": None, "max_iter": 1000, "search_steps": 8}
    train_views = "clean"
    has_prototypes = True

    def validate(self) -> None:
        self._number("C", 0, open_low=True, allow_none=True)
        self._number("max_iter", 1, integer=True)
        self._number("search_steps", 0, integer=True)

    def needs_validation(self) -> bool:
        return self.hparams["C"] is None

    def fit(self, ctx: FitContext) -> FitResult:
        x = F.normalize(ctx.train_views[:, 0].double(), dim=-1).cpu()
        y = ctx.labels.long().cpu()
        k = ctx.num_classes
        objective = self.objective()
        max_iter = int(self.hparams["max_iter"])
        info: dict = {"n_train": int(len(y))}
        if self.hparams["C"] is not None:
            c = float(self.hparams["C"])
        else:
            if ctx.val_features is None:
                raise ValueError("linear-probe chooses C on the validation shots: set val_shots >= 1, or give "
                                 "method.C")
            xv = F.normalize(ctx.val_features.double(), dim=-1).cpu()
            yv = ctx.val_labels.long().cpu()

            def score(c_value: float) -> float:
                w, b, _ = fit_logistic(x, y, k, c_value, objective, max_iter)
                return val_accuracy(xv @ w.t() + b, yv)

            c, trace = search_c(score, int(self.hparams["search_steps"]))
            info["C_search"] = trace
        w, b, steps = fit_logistic(x, y, k, c, objective, max_iter)
        info.update(C=c, steps=steps)
        return FitResult(LinearHead(w.float(), b.float(), scale=1.0, normalize_weight=False), info)


def search_c(score, steps: int) -> tuple[float, list[tuple[float, float]]]:
    """CoOp's search: the best C of :data:`C_GRID` (first wins ties), then ``steps`` bisections on
    log10 C between 0.1x and 10x of it; returns the last step's winner and every (C, accuracy) tried."""
    trace = [(c, score(c)) for c in C_GRID]
    best = max(range(len(trace)), key=lambda i: (trace[i][1], -i))
    peak = trace[best][0]
    left, right = peak * 0.1, peak * 10.0
    chosen = peak
    for _ in range(steps):
        acc_left, acc_right = score(left), score(right)
        trace += [(left, acc_left), (right, acc_right)]
        middle = 10 ** ((math.log10(left) + math.log10(right)) / 2)
        if acc_left < acc_right:
            chosen, left = right, middle
        else:
            chosen, right = left, middle
    return chosen, trace
