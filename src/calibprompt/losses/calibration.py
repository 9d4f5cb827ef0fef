"""Calibration regularisers on the predictions: pair them with a task loss (SMAC, MDCA, DCA, MMCE,
Penalty, margin mean-variance). None of them contains CE.

Notation (docs/method.md §3): p_i = softmax(z_i), conf_i = max_k p_ik, ŷ_i = argmax_k p_ik,
f_c = (1/B) Σ_i 1[y_i = c] the class frequency in the batch.
"""

from __future__ import annotations

import torch

from .base import Loss, LossInputs, Param, non_negative, one_hot, safe_sqrt, unit_interval_open, zero_like_graph


def class_frequencies(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """f_c = (1/B) Σ_i 1[y_i = c], shape (K,)."""
    return one_hot(labels, k, dtype).mean(dim=0)


def smoothed_frequencies(labels: torch.Tensor, k: int, alpha: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s_c = (1 − α) f_c + α (1 − f_c)/(K − 1), the batch mean of the LS targets q_ic.

    Identity: s_c − 1/K = (1 − αK/(K−1)) (f_c − 1/K). In a class-balanced batch f_c = 1/K, so s_c = 1/K
    whatever α is, and SMAC = MDCA (docs/parity.md, Q6).
    """
    f = class_frequencies(labels, k, dtype)
    return (1.0 - alpha) * f + alpha * (1.0 - f) / (k - 1)


class MDCA(Loss):
    """MDCA (Hebbalaguppe et al., CVPR 2022): (1/K) Σ_c | (1/B) Σ_i p_ic − f_c |."""

    name = "MDCA"
    kind = "calibration"
    formula = "(1/K) sum_c |mean_i p_ic - f_c|"

    def compute(self, x: LossInputs) -> torch.Tensor:
        p = torch.softmax(x.logits, dim=-1)
        f = class_frequencies(x.labels, x.num_classes, p.dtype)
        return (p.mean(dim=0) - f).abs().mean()


class SMAC(Loss):
    """SMAC (CalibPrompt): (1/K) Σ_c | (1/B) Σ_i p_ic − s_c |, s_c the smoothed batch frequency.

    SMAC(α=0) = MDCA. In a class-balanced batch SMAC does not depend on α (Q6): with 8 shots, batch 16
    and K = 2 every batch is balanced, so α then acts only through LS.
    """

    name = "SMAC"
    kind = "calibration"
    formula = "(1/K) sum_c |mean_i p_ic - s_c|, s_c = (1-alpha) f_c + alpha (1-f_c)/(K-1)"
    params = (unit_interval_open("alpha", 0.1),)

    def compute(self, x: LossInputs) -> torch.Tensor:
        p = torch.softmax(x.logits, dim=-1)
        s = smoothed_frequencies(x.labels, x.num_classes, self.hparams["alpha"], p.dtype)
        return (p.mean(dim=0) - s).abs().mean()


class DCA(Loss):
    """DCA (Liang et al., 2020): | mean_i conf_i − mean_i 1[ŷ_i = y_i] |."""

    name = "DCA"
    kind = "calibration"
    formula = "|mean_i conf_i - mean_i 1[yhat_i = y_i]|"

    def compute(self, x: LossInputs) -> torch.Tensor:
        conf, pred = torch.softmax(x.logits, dim=-1).max(dim=-1)
        acc = (pred == x.labels).to(conf.dtype)
        return (conf.mean() - acc.mean()).abs()


def _laplace_kernel(a: torch.Tensor, b: torch.Tensor, width: float = 0.4) -> torch.Tensor:
    return torch.exp(-(a[:, None] - b[None, :]).abs() / width)


class MMCE(Loss):
    """Weighted MMCE (Kumar et al., 2018) with a Laplacian kernel k(r, r') = exp(−|r − r'|/0.4).

    r_i = conf_i; C the m correct samples, I the n incorrect ones.
    standard: MMCE_w² = Σ_{C×C}(1−r_i)(1−r_j)k/m² + Σ_{I×I} r_i r_j k/n² − 2 Σ_{C×I}(1−r_i) r_j k/(mn).
    reference: each pair sum is averaged over its pair matrix and then divided again by (m² + 1e−5),
    (n² + 1e−5) and (mn + 1e−5), i.e. effective denominators m⁴, n⁴, m²n² (the official code, Q10).
    loss = sqrt(max(MMCE_w² + 1e−10, 0)) when C and I are both non-empty, else 0.
    ``normalisation`` ("textbook" | "reference") overrides the convention.
    """

    name = "MMCE"
    default_weight = 2.0
    kind = "calibration"
    formula = "sqrt(weighted MMCE^2 + 1e-10) with Laplacian kernel (width 0.4) on confidences"
    params = (Param("normalisation", None, "choice", choices=("textbook", "reference"), allow_none=True),)
    reference_note = "pair sums normalised twice: denominators m^4, n^4, m^2 n^2 instead of m^2, n^2, mn (Q10)"

    def compute(self, x: LossInputs) -> torch.Tensor:
        conf, pred = torch.softmax(x.logits, dim=-1).max(dim=-1)
        correct = pred == x.labels
        m = int(correct.sum())
        n = conf.shape[0] - m
        if m == 0 or n == 0:
            return zero_like_graph(conf)
        r_c, r_i = conf[correct], conf[~correct]
        w_c = 1.0 - r_c
        cc = (w_c[:, None] * w_c[None, :] * _laplace_kernel(r_c, r_c)).sum()
        ii = (r_i[:, None] * r_i[None, :] * _laplace_kernel(r_i, r_i)).sum()
        ci = (w_c[:, None] * r_i[None, :] * _laplace_kernel(r_c, r_i)).sum()
        mode = self.hparams["normalisation"] or ("reference" if self.convention == "reference" else "textbook")
        d_cc, d_ii, d_ci = float(m * m), float(n * n), float(m * n)
        if mode == "reference":
            d_cc, d_ii, d_ci = d_cc * (d_cc + 1e-5), d_ii * (d_ii + 1e-5), d_ci * (d_ci + 1e-5)
        value = cc / d_cc + ii / d_ii - 2.0 * ci / d_ci
        return safe_sqrt(value + 1e-10)


class ZeroShotPenalty(Loss):
    """Penalty (Murugesan et al., ECCV 2024): keep the logits inside each sample's zero-shot range.

    mean_{i,k} ReLU(z_ik − max_k zs_ik) + mean_{i,k} ReLU(min_k zs_ik − z_ik). Pair it with CE.
    The official code returns 0 without zero-shot logits (Q17); here that is an error.
    """

    name = "ECCV_PENALTY"
    kind = "calibration"
    formula = "mean_ik ReLU(z_ik - max_k zs_ik) + mean_ik ReLU(min_k zs_ik - z_ik)"
    needs = frozenset({"zs_logits"})

    def compute(self, x: LossInputs) -> torch.Tensor:
        z, zs = x.logits, x.zs_logits
        upper = zs.max(dim=1, keepdim=True).values
        lower = zs.min(dim=1, keepdim=True).values
        return torch.relu(z - upper).mean() + torch.relu(lower - z).mean()


class MarginMeanVar(Loss):
    """Margin mean-variance (TCPT): −α · mean_i m_i + β · Var_i(m_i) (population variance),
    with m_i = z_{i,y_i} − max_{k≠y_i} z_ik. The official loss's defaults: α = 0.1, β = 0.01."""

    name = "MARGIN_MEAN_VAR"
    kind = "calibration"
    formula = "-alpha mean_i m_i + beta Var_i m_i, m_i = z_{i,y_i} - max_{k!=y_i} z_ik"
    params = (non_negative("alpha", 0.1), non_negative("beta", 0.01))

    def compute(self, x: LossInputs) -> torch.Tensor:
        z = x.logits
        true = z.gather(1, x.labels[:, None]).squeeze(1)
        is_true = one_hot(x.labels, x.num_classes, torch.bool)
        other = z.masked_fill(is_true, float("-inf")).max(dim=1).values
        margin = true - other
        return -self.alpha * margin.mean() + self.beta * margin.var(unbiased=False)


CALIBRATION_LOSSES: tuple[type[Loss], ...] = (SMAC, MDCA, DCA, MMCE, ZeroShotPenalty, MarginMeanVar)
