"""CalibPrompt without manual tuning: alpha and lambda_AS chosen inside the run, from the training shots.

The training shots are split into ``folds`` class-stratified folds (seeded by the run seed). For every
candidate (alpha, lambda_AS) of the grid, CalibPrompt (LS(alpha) + SMAC(alpha) + lambda_AS * AS) is
trained on all folds but one and scored on the held-out one, for each fold; the held-out predictions of
all folds are pooled. The choice: among candidates whose pooled held-out accuracy is within
``acc_tolerance`` of the best, the lowest held-out ECE (10 equal-width bins), ties to the first in grid
order -- the rule the demo uses to pick its CalibPrompt values on the validation split (docs/demo.md).
CalibPrompt is then trained on all the shots with the chosen values.

Only ``FitContext.train_views`` and ``labels`` are read: never the validation shots (``val_features``)
nor, by construction, the test split. Held-out scoring uses each image's first training view (the test
transform when ``train.augment`` is false, one augmented view otherwise). Cost: folds x grid + 1 trainings.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from calibprompt.methods.base import FitContext, FitResult, register_method
from calibprompt.methods.coop import CoOp


def calibprompt_losses(alpha: float, lambda_as: float) -> list[dict]:
    return [{"name": "LS", "weight": 1.0, "alpha": float(alpha)}, {"name": "SMAC", "weight": 1.0, "alpha": float(alpha)},
            {"name": "AS", "weight": float(lambda_as)}]


def held_out_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins (right-closed)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    bins = torch.clamp(torch.ceil(conf.double() * n_bins).long() - 1, 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            total += float(inside.double().mean() * (correct[inside].mean() - conf[inside].double().mean()).abs())
    return total


@register_method
class CoOpAuto(CoOp):
    name = "coop-auto"
    formula = ("CalibPrompt with (alpha, lambda_as) = argmin held-out ECE over a grid, among candidates within "
               "acc_tolerance of the best held-out accuracy, by k-fold cross-validation on the training shots")
    reference = "this project (CalibPrompt's future work: no manual tuning); docs/methods.md"
    params = {"alphas": [0.02, 0.1], "lambdas": [0.01, 1.0], "folds": 2, "acc_tolerance": 0.01}

    def validate(self) -> None:
        for key in ("alphas", "lambdas"):
            values = self.hparams[key]
            if not isinstance(values, (list, tuple)) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
                raise ValueError(f"calibprompt-auto: {key} must be a non-empty list of numbers >= 0, got {values!r}")
        if any(a >= 1 for a in self.hparams["alphas"]):
            raise ValueError(f"calibprompt-auto: alphas must be below 1, got {self.hparams['alphas']}")
        self._number("folds", 2, None, integer=True)
        self._number("acc_tolerance", 0, 1)

    def fit(self, ctx: FitContext) -> FitResult:
        folds = self._folds(ctx)
        rows = []
        for alpha, lam in itertools.product(self.hparams["alphas"], self.hparams["lambdas"]):
            probs, labels = [], []
            for f in range(int(self.hparams["folds"])):
                train, held = folds != f, folds == f
                sub = replace(ctx, train_views=ctx.train_views[train], labels=ctx.labels[train], val_features=None,
                              val_labels=None, progress=False)
                head = CoOp(losses=calibprompt_losses(alpha, lam)).fit(sub).head
                with torch.no_grad():
                    probs.append(torch.softmax(head(ctx.train_views[held, 0].to(ctx.device)).float().cpu(), dim=1))
                labels.append(ctx.labels[held])
            p, y = torch.cat(probs), torch.cat(labels)
            rows.append({"alpha": float(alpha), "lambda_as": float(lam),
                         "accuracy": float((p.argmax(1) == y).double().mean()), "ece": held_out_ece(p, y)})
        best_acc = max(r["accuracy"] for r in rows)
        chosen = min((r for r in rows if r["accuracy"] >= best_acc - float(self.hparams["acc_tolerance"]) - 1e-12),
                     key=lambda r: r["ece"])
        self.losses = calibprompt_losses(chosen["alpha"], chosen["lambda_as"])
        result = super().fit(ctx)
        result.info["auto"] = {"alpha": chosen["alpha"], "lambda_as": chosen["lambda_as"], "folds": int(self.hparams["folds"]),
                               "candidates": rows}
        return result

    def _folds(self, ctx: FitContext) -> torch.Tensor:
        """Fold index per training image: each class's images in a seeded order, dealt round-robin."""
        k = int(self.hparams["folds"])
        folds = torch.empty(len(ctx.labels), dtype=torch.long)
        gen = ctx.generator(salt=7)
        for c in range(ctx.num_classes):
            idx = torch.nonzero(ctx.labels == c).flatten()
            if len(idx) < k:
                raise ValueError(f"calibprompt-auto: class {ctx.classnames[c]!r} has {len(idx)} training shot(s); "
                                 f"{k}-fold cross-validation needs at least {k} (raise shots or lower folds)")
            folds[idx[torch.randperm(len(idx), generator=gen)]] = torch.arange(len(idx)) % k
        return folds
