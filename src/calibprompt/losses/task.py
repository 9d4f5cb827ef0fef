"""Task losses: each one alone can train the prompts (CE, LS, FL, MbLS, LogitNorm, ZS-Norm).

Notation (docs/method.md §3): p_i = softmax(z_i), y_i the label, K classes, B the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Loss, LossInputs, Param, log_probs, non_negative, one_hot, positive, unit_interval_open


class CrossEntropy(Loss):
    """L_CE = (1/B) Σ_i −log p_{i,y_i}."""

    name = "CE"
    kind = "task"
    formula = "mean_i -log p_{i,y_i}"

    def compute(self, x: LossInputs) -> torch.Tensor:
        return F.nll_loss(log_probs(x.logits), x.labels)


class LabelSmoothing(Loss):
    """L_LS = (1/B) Σ_i Σ_k −q_ik log p_ik with q_ik = 1−α if k = y_i else α/(K−1).

    Not PyTorch's ``label_smoothing=α`` (which gives α/K to every class, the true one included):
    CalibPrompt's off-target mass is α/(K−1) (docs/parity.md, Q7). LS(α=0) = CE.
    """

    name = "LS"
    kind = "task"
    formula = "mean_i sum_k -q_ik log p_ik, q_ik = 1-alpha if k=y_i else alpha/(K-1)"
    params = (unit_interval_open("alpha", 0.1),)

    def compute(self, x: LossInputs) -> torch.Tensor:
        logp = log_probs(x.logits)
        k, alpha = x.num_classes, self.hparams["alpha"]
        q = one_hot(x.labels, k, logp.dtype) * (1.0 - alpha - alpha / (k - 1)) + alpha / (k - 1)
        return -(q * logp).sum(dim=-1).mean()


class FocalLoss(Loss):
    """L_FL = (1/B) Σ_i −(1 − p_{i,y_i})^γ log p_{i,y_i} (no α-balancing). FL(γ=0) = CE."""

    name = "FL"
    kind = "task"
    formula = "mean_i -(1 - p_{i,y_i})^gamma log p_{i,y_i}"
    params = (non_negative("gamma", 3.0),)

    def compute(self, x: LossInputs) -> torch.Tensor:
        logpt = log_probs(x.logits).gather(1, x.labels[:, None]).squeeze(1)
        weight = (1.0 - logpt.exp()).pow(self.hparams["gamma"])
        return -(weight * logpt).mean()


class MarginLabelSmoothing(Loss):
    """MbLS (Liu et al., CVPR 2022): CE + α_m · hinge, hinge_ik = ReLU(max_j z_ij − z_ik − m).

    standard: hinge summed over classes, averaged over samples (the paper).
    reference: hinge averaged over all B×K entries (the official code), i.e. 1/K of the paper's (Q11).
    ``reduction`` ("sum" | "mean") overrides the convention. The margin is in logit units; CLIP-style
    logit scales are about 100, so the default m = 10 is a cosine gap of about 0.1.
    """

    name = "MBLS"
    kind = "task"
    formula = "CE + alpha * mean_i sum_k ReLU(max_j z_ij - z_ik - margin)"
    params = (
        non_negative("margin", 10.0),
        non_negative("alpha", 0.1),
        Param("reduction", None, "choice", choices=("sum", "mean"), allow_none=True),
    )
    reference_note = "hinge averaged over B*K entries (1/K of the paper's sum over classes), Q11"

    def compute(self, x: LossInputs) -> torch.Tensor:
        z = x.logits
        ce = F.nll_loss(log_probs(z), x.labels)
        hinge = F.relu(z.max(dim=1, keepdim=True).values - z - self.hparams["margin"])
        reduction = self.hparams["reduction"] or ("mean" if self.convention == "reference" else "sum")
        margin_term = hinge.mean() if reduction == "mean" else hinge.sum(dim=1).mean()
        return ce + self.hparams["alpha"] * margin_term


class LogitNorm(Loss):
    """LogitNorm (Wei et al., 2022): CE on z_i / (t · (‖z_i‖₂ + 1e−7)).

    The normalised logits have norm 1/t, which caps the confidence; with the official t = 1 the model
    is strongly underconfident by construction (about 0.80 at most for K = 2).
    """

    name = "LOGITNORM"
    kind = "task"
    formula = "CE(z_i / (t * (||z_i||_2 + 1e-7)))"
    params = (positive("t", 1.0),)

    def compute(self, x: LossInputs) -> torch.Tensor:
        z = x.logits
        z = z / ((z.norm(p=2, dim=-1, keepdim=True) + 1e-7) * self.hparams["t"])
        return F.nll_loss(log_probs(z), x.labels)


class ZeroShotNorm(Loss):
    """ZS-Norm (Murugesan et al., ECCV 2024): CE on the logits mapped into the zero-shot logit range.

    a_i = min_k z_ik, r_i = max(max_k z_ik − a_i, 1e−6), u_ik = clip((z_ik − a_i)/r_i, 0, 1),
    z̃_ik = min_k zs_ik + max(max_k zs_ik − min_k zs_ik, 1e−6) · u_ik, loss = CE(z̃, y).
    Needs the frozen zero-shot logits; the official code falls back to plain CE without them (Q17).
    """

    name = "ECCV_ZS"
    kind = "task"
    formula = "CE(min zs + range(zs) * (z - min z) / range(z))"
    needs = frozenset({"zs_logits"})

    def compute(self, x: LossInputs) -> torch.Tensor:
        z, zs = x.logits, x.zs_logits
        a = z.min(dim=1, keepdim=True).values
        r = (z.max(dim=1, keepdim=True).values - a).clamp_min(1e-6)
        u = ((z - a) / r).clamp(0.0, 1.0)
        zs_min = zs.min(dim=1, keepdim=True).values
        zs_range = (zs.max(dim=1, keepdim=True).values - zs_min).clamp_min(1e-6)
        return F.nll_loss(log_probs(zs_min + zs_range * u), x.labels)


TASK_LOSSES: tuple[type[Loss], ...] = (
    CrossEntropy,
    LabelSmoothing,
    FocalLoss,
    MarginLabelSmoothing,
    LogitNorm,
    ZeroShotNorm,
)
