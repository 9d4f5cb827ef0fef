"""Regularisers on the class text features T (K × D, rows t_k), no images involved:
AS, text moment matching, C-TPT dispersion, O-TPT orthogonality, KgCoOp.

Rows are re-normalised to unit length before use. That is a no-op on the L2-normalised features the
trainer passes, and it keeps the losses defined as functions of cosines if a caller forgets. Under
``convention="reference"`` AS and text moment matching use the features exactly as given, as the
official functions do (the two agree on unit-norm features).
"""

from __future__ import annotations

import torch

from .base import Loss, LossInputs, Param, safe_sqrt, unit_rows


def _gram_off_diagonal(t: torch.Tensor) -> torch.Tensor:
    """C = T Tᵀ with the diagonal set to 0 (cosines between distinct prototypes)."""
    gram = t @ t.T
    return gram * (1.0 - torch.eye(t.shape[0], device=t.device, dtype=t.dtype))


class AngularSeparation(Loss):
    """AS (CalibPrompt): mean pairwise cosine between class prototypes, minimised.

    L_AS = (1/(K(K−1))) Σ_{k≠j} cos(t_k, t_j) = (K‖μ‖² − 1)/(K − 1), μ = mean_k t_k.
    K = 2: L_AS = cos(t_0, t_1). Range [−1/(K−1) (regular simplex), 1 (identical prototypes)].
    Under ``convention="reference"`` the features are used exactly as given (the official function
    does not re-normalise rows, so for unnormalised inputs it is a mean dot product).
    """

    name = "AS"
    kind = "text"
    formula = "(1/(K(K-1))) sum_{k!=j} cos(t_k, t_j)"
    needs = frozenset({"text_features"})
    uses_logits = False
    reference_note = "rows used as given (no re-normalisation): equal to standard on unit-norm features"

    def compute(self, x: LossInputs) -> torch.Tensor:
        k = x.num_classes
        t = x.text_features if self.convention == "reference" else unit_rows(x.text_features)
        return _gram_off_diagonal(t).sum() / (k * (k - 1))


class TextMomentMatching(Loss):
    """‖μ_T − μ_T0‖² + ‖Σ_T − Σ_T0‖²_F over the K class features (TCPT).

    T are the tuned features, T0 the frozen zero-shot ones; Σ is the population covariance (divisor K).
    The official code returns 0 for BERT backbones (Q17); here it works for every family.
    """

    name = "TEXT_MOMENT_MATCHING"
    default_weight = 5.0
    reference_note = "features used as given (no re-normalisation): equal to standard on unit-norm features"
    kind = "text"
    formula = "||mu_T - mu_T0||^2 + ||Sigma_T - Sigma_T0||_F^2"
    needs = frozenset({"text_features", "zs_text_features"})
    uses_logits = False

    @staticmethod
    def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = t.mean(dim=0)
        centred = t - mu
        return mu, centred.T @ centred / t.shape[0]

    def compute(self, x: LossInputs) -> torch.Tensor:
        t, t0 = x.text_features, x.zs_text_features
        if self.convention == "standard":
            t, t0 = unit_rows(t), unit_rows(t0)
        mu, cov = self._moments(t)
        mu0, cov0 = self._moments(t0)
        return (mu - mu0).pow(2).sum() + (cov - cov0).pow(2).sum()


class CTPTDispersion(Loss):
    """C-TPT (ICLR 2024) as a train-time regulariser: −ATFD, ATFD = (1/K) Σ_k ‖t_k − t̄‖₂.

    Minimising it spreads the prototypes away from their centroid t̄ (the same geometry as AS).
    The published λ (50 fine-grained, 20 ImageNet shifts) is the objective weight.
    """

    name = "CTPT_DISPERSION"
    kind = "text"
    formula = "-(1/K) sum_k ||t_k - mean_j t_j||_2"
    needs = frozenset({"text_features"})
    uses_logits = False

    def compute(self, x: LossInputs) -> torch.Tensor:
        t = unit_rows(x.text_features)
        return -(t - t.mean(dim=0)).norm(p=2, dim=-1).mean()


class OTPTOrthogonality(Loss):
    """O-TPT (CVPR 2025) as a train-time regulariser: ‖T Tᵀ − I_K‖ on normalised T.

    The diagonal of T Tᵀ is 1, so the squared-sum form equals Σ_{k≠j} cos²(t_k, t_j).
    Variant (the O-TPT training code was not available, docs/method.md §11):
    ``squared`` (default True): squared Frobenius norm, else its square root (the plain norm);
    ``reduction`` "sum" (default) over the K² entries, or "mean" (divide by K²) before any root.
    """

    name = "OTPT_ORTHO"
    kind = "text"
    formula = "||T T^T - I||_F^2 = sum_{k!=j} cos^2(t_k, t_j)"
    params = (
        Param("squared", True, "bool"),
        Param("reduction", "sum", "choice", choices=("sum", "mean")),
    )
    needs = frozenset({"text_features"})
    uses_logits = False

    def compute(self, x: LossInputs) -> torch.Tensor:
        t = unit_rows(x.text_features)
        value = _gram_off_diagonal(t).pow(2).sum()  # diagonal of T Tᵀ − I is exactly 0
        if self.hparams["reduction"] == "mean":
            value = value / (x.num_classes**2)
        return value if self.hparams["squared"] else safe_sqrt(value)


class KgCoOp(Loss):
    """KgCoOp (Yao et al., CVPR 2023): 1 − (1/K) Σ_k cos(t_k, t0_k), t0 the hand-written prompts.

    KgCoOp's published weight is λ = 8 (the `kgcoop` method preset); the registry default weight is 1.
    """

    name = "KGCOOP"
    kind = "text"
    formula = "1 - (1/K) sum_k cos(t_k, t0_k)"
    needs = frozenset({"text_features", "zs_text_features"})
    uses_logits = False

    def compute(self, x: LossInputs) -> torch.Tensor:
        cos = (unit_rows(x.text_features) * unit_rows(x.zs_text_features)).sum(dim=-1)
        return 1.0 - cos.mean()


TEXT_LOSSES: tuple[type[Loss], ...] = (
    AngularSeparation,
    TextMomentMatching,
    CTPTDispersion,
    OTPTOrthogonality,
    KgCoOp,
)
