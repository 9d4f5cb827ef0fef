"""Parity with the official loss functions where the inputs are not what our trainer passes: AS and text
moment matching on *unnormalised* features, and margin mean-variance with its two coefficients. The
oracles below are written from the official functions' definitions (not imported)."""

from __future__ import annotations

import pytest
import torch

from calibprompt.losses import get_loss


def official_as(features: torch.Tensor) -> torch.Tensor:
    """Mean over classes of the mean similarity to the other classes, on the features as given."""
    n = features.shape[0]
    sims = features @ features.T
    sims = sims.masked_fill(torch.eye(n, dtype=torch.bool), 0.0)
    return (sims.sum(dim=1) / (n - 1)).mean()


def official_tmm(tuned: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    mu_t, mu_f = tuned.mean(0, keepdim=True), frozen.mean(0, keepdim=True)
    ct, cf = tuned - mu_t, frozen - mu_f
    b = tuned.shape[0]
    return ((mu_t - mu_f) ** 2).sum() + ((ct.T @ ct / b - cf.T @ cf / b) ** 2).sum()


def official_mmv(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    rows = torch.arange(len(labels))
    true = logits[rows, labels]
    rest = logits.clone()
    rest[rows, labels] = float("-inf")
    margins = true - rest.max(dim=1).values
    return -alpha * margins.mean() + beta * margins.var(unbiased=False)


CASES = [(k, d, scale, seed) for k, d, scale, seed in [(2, 8, 3.0, 0), (3, 16, 0.2, 1), (9, 32, 7.5, 2), (5, 4, 1.0, 3)]]


@pytest.mark.parametrize("k,d,scale,seed", CASES)
def test_as_reference_uses_features_as_given(k, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(k, d, generator=g, dtype=torch.float64) * scale  # rows far from unit norm
    ref = get_loss("AS", convention="reference")(None, None, t)
    assert torch.allclose(ref, official_as(t), atol=1e-12)
    std = get_loss("AS")(None, None, t)
    assert torch.allclose(std, official_as(torch.nn.functional.normalize(t, dim=-1)), atol=1e-12)
    if abs(scale - 1.0) > 0.5:
        assert not torch.allclose(std, ref)  # the two conventions differ on unnormalised input


@pytest.mark.parametrize("k,d,scale,seed", CASES)
def test_text_moment_matching_reference_uses_features_as_given(k, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    t, t0 = (torch.randn(k, d, generator=g, dtype=torch.float64) * scale for _ in range(2))
    loss = get_loss("TEXT_MOMENT_MATCHING", convention="reference")
    assert torch.allclose(loss(None, None, t, zs_text_features=t0), official_tmm(t, t0), atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.01), (1.0, 1.0), (0.0, 0.5), (2.5, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_mean_var_takes_the_official_coefficients(alpha, beta, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(4, (12,), generator=g)
    ours = get_loss("MARGIN_MEAN_VAR", alpha=alpha, beta=beta)(logits, labels)
    assert torch.allclose(ours, official_mmv(logits, labels, alpha, beta), atol=1e-12)
    default = get_loss("MARGIN_MEAN_VAR")(logits, labels)
    assert torch.allclose(default, official_mmv(logits, labels, 0.1, 0.01), atol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        get_loss("MARGIN_MEAN_VAR", alpha=-1.0)
