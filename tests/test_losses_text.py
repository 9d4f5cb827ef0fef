"""Losses on the class text features: AS, moment matching, C-TPT, O-TPT, KgCoOp (docs/method.md §3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calibprompt.losses import get_loss

DUMMY_LOGITS = torch.zeros(2, 2)
DUMMY_LABELS = torch.tensor([0, 1])


def _features(k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)


def _text(name: str, t: torch.Tensor, t0: torch.Tensor | None = None, **params) -> torch.Tensor:
    # text losses ignore logits and labels; pass None to show they are not needed
    return get_loss(name, **params)(None, None, t, zs_text_features=t0)


def _simplex(k: int) -> torch.Tensor:
    """K unit vectors with pairwise cosine -1/(K-1)."""
    centred = torch.eye(k, dtype=torch.float64) - 1.0 / k
    return F.normalize(centred, dim=1)


# ----------------------------------------------------------------------------------------- AS
def test_as_binary_equals_the_cosine():
    t = _features(2)
    assert _text("AS", t).item() == pytest.approx((t[0] @ t[1]).item(), abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 9])
def test_as_regular_simplex_is_minus_one_over_k_minus_1(k):
    assert _text("AS", _simplex(k)).item() == pytest.approx(-1.0 / (k - 1), abs=1e-12)


def test_as_identical_prototypes_is_one():
    t = _features(1).repeat(4, 1)
    assert _text("AS", t).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_as_closed_form_in_the_centroid(k):
    t = _features(k, seed=k)
    mu = t.mean(0)
    expected = (k * (mu @ mu) - 1) / (k - 1)
    assert _text("AS", t).item() == pytest.approx(expected.item(), abs=1e-12)
    # and the pairwise definition
    pairs = sum((t[a] @ t[b]).item() for a in range(k) for b in range(k) if a != b)
    assert _text("AS", t).item() == pytest.approx(pairs / (k * (k - 1)), abs=1e-12)


def test_as_without_text_features_raises():
    with pytest.raises(ValueError, match="'AS' needs text_features"):
        get_loss("AS")(DUMMY_LOGITS, DUMMY_LABELS)


def test_text_features_rows_must_match_k():
    with pytest.raises(ValueError, match="3 rows but logits have K=2"):
        get_loss("AS")(DUMMY_LOGITS, DUMMY_LABELS, _features(3))


# ----------------------------------------------------------------------------------------- moment matching
def test_text_moment_matching_is_zero_when_t_equals_t0():
    t = _features(4)
    assert _text("TEXT_MOMENT_MATCHING", t, t.clone()).item() == pytest.approx(0.0, abs=1e-14)


def test_text_moment_matching_hand_value():
    t = _features(3, d=5, seed=1)
    t0 = _features(3, d=5, seed=2)

    def moments(x):
        mu = x.mean(0)
        cov = sum(torch.outer(r - mu, r - mu) for r in x) / len(x)  # population covariance
        return mu, cov

    (mu, cov), (mu0, cov0) = moments(t), moments(t0)
    expected = ((mu - mu0) ** 2).sum() + ((cov - cov0) ** 2).sum()
    assert _text("TEXT_MOMENT_MATCHING", t, t0).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("name", ["TEXT_MOMENT_MATCHING", "KGCOOP"])
def test_losses_needing_zero_shot_features_raise_without_them(name):
    loss = get_loss(name)
    assert loss.needs == {"text_features", "zs_text_features"}
    with pytest.raises(ValueError, match=f"'{name}' needs zs_text_features"):
        loss(None, None, _features(3))
    with pytest.raises(ValueError, match="zs_text_features must have the shape"):
        loss(None, None, _features(3), zs_text_features=_features(2))


# ----------------------------------------------------------------------------------------- C-TPT / O-TPT / KgCoOp
def test_ctpt_dispersion_hand_value():
    t = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert _text("CTPT_DISPERSION", t).item() == pytest.approx(-1.0, abs=1e-12)  # both at distance 1 from 0
    t = _features(4, seed=3)
    expected = -(t - t.mean(0)).norm(dim=1).mean()
    assert _text("CTPT_DISPERSION", t).item() == pytest.approx(expected.item(), abs=1e-12)


def test_otpt_squared_sum_is_sum_of_squared_off_diagonal_cosines():
    k = 4
    t = _features(k, seed=4)
    expected = sum((t[a] @ t[b]).item() ** 2 for a in range(k) for b in range(k) if a != b)
    frob = torch.linalg.matrix_norm(t @ t.T - torch.eye(k, dtype=torch.float64)) ** 2
    assert expected == pytest.approx(frob.item(), abs=1e-12)
    assert _text("OTPT_ORTHO", t).item() == pytest.approx(expected, abs=1e-12)
    assert _text("OTPT_ORTHO", t, reduction="mean").item() == pytest.approx(expected / k**2, abs=1e-12)
    assert _text("OTPT_ORTHO", t, squared=False).item() == pytest.approx(math.sqrt(expected), abs=1e-12)
    assert _text("OTPT_ORTHO", torch.eye(3, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)


def test_kgcoop_is_one_minus_mean_cosine():
    t, t0 = _features(3, seed=5), _features(3, seed=6)
    expected = 1 - (t * t0).sum(1).mean()
    assert _text("KGCOOP", t, t0).item() == pytest.approx(expected.item(), abs=1e-12)
    assert _text("KGCOOP", t, t.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["AS", "TEXT_MOMENT_MATCHING", "CTPT_DISPERSION", "OTPT_ORTHO", "KGCOOP"])
def test_gradients_flow_to_text_features_and_not_to_zero_shot_features(name):
    t = _features(3, seed=7).requires_grad_(True)
    t0 = _features(3, seed=8).requires_grad_(True)
    value = get_loss(name)(None, None, t, zs_text_features=t0)
    value.backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert t0.grad is None


def test_identical_prototypes_give_finite_gradients():
    t = _features(1).repeat(3, 1).requires_grad_(True)
    for name in ("CTPT_DISPERSION", "OTPT_ORTHO"):
        t.grad = None
        get_loss(name, **({"squared": False} if name == "OTPT_ORTHO" else {}))(None, None, t).backward()
        assert torch.isfinite(t.grad).all(), name
