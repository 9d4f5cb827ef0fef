"""Task and calibration losses against their definitions (docs/method.md §3) and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from calibprompt.losses import get_loss, smoothed_frequencies


def _batch(n: int = 12, k: int = 4, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, k, (n,), generator=g)
    return logits, labels


def _ce(logits, labels):
    return F.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------- CE / LS
def test_ce_matches_hand_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert get_loss("CE")(logits, labels).item() == pytest.approx(expected, abs=1e-12)


def test_ls_alpha_zero_equals_ce():
    logits, labels = _batch()
    assert torch.allclose(get_loss("LS", alpha=0.0)(logits, labels), _ce(logits, labels), atol=1e-12)


def test_ls_off_target_mass_is_alpha_over_k_minus_1():
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1])
    logp = torch.log_softmax(logits, dim=1)[0]
    # q = (0.15, 0.70, 0.15): 1 - alpha on the true class, alpha / (K - 1) = 0.3 / 2 on the others
    expected = -(0.15 * logp[0] + 0.70 * logp[1] + 0.15 * logp[2])
    value = get_loss("LS", alpha=0.3)(logits, labels)
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    # PyTorch's label_smoothing gives alpha / K = 0.1 to every class: a different loss
    torch_ls = F.cross_entropy(logits, labels, label_smoothing=0.3)
    assert abs(torch_ls.item() - value.item()) > 1e-3


def test_ls_gradient_is_p_minus_q():
    logits, labels = _batch(n=5, k=3)
    logits.requires_grad_(True)
    get_loss("LS", alpha=0.2)(logits, labels).backward()
    q = torch.full((5, 3), 0.1, dtype=torch.float64)
    q[torch.arange(5), labels] = 0.8
    expected = (torch.softmax(logits.detach(), 1) - q) / 5
    assert torch.allclose(logits.grad, expected, atol=1e-12)


# ----------------------------------------------------------------------------------------- FL
def test_fl_gamma_zero_equals_ce():
    logits, labels = _batch()
    assert torch.allclose(get_loss("FL", gamma=0.0)(logits, labels), _ce(logits, labels), atol=1e-12)


def test_fl_hand_value_and_default_gamma():
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (0.25, 0.75)
    labels = torch.tensor([1])
    loss = get_loss("FL")
    assert loss.gamma == 3.0
    assert loss(logits, labels).item() == pytest.approx(-(0.25**3) * math.log(0.75), abs=1e-12)


# ----------------------------------------------------------------------------------------- MbLS
def test_mbls_huge_margin_equals_ce():
    logits, labels = _batch(scale=20.0)
    for convention in ("standard", "reference"):
        value = get_loss("MBLS", margin=1e6, convention=convention)(logits, labels)
        assert torch.allclose(value, _ce(logits, labels), atol=1e-12)


def test_mbls_reference_hinge_is_standard_over_k():
    k = 5
    logits, labels = _batch(k=k, scale=20.0)
    ce = _ce(logits, labels)
    std = get_loss("MBLS", margin=2.0, alpha=0.1)(logits, labels) - ce
    ref = get_loss("MBLS", margin=2.0, alpha=0.1, convention="reference")(logits, labels) - ce
    assert std.item() > 0
    assert ref.item() == pytest.approx(std.item() / k, rel=1e-10)
    # the explicit switch overrides the convention
    mean = get_loss("MBLS", margin=2.0, alpha=0.1, reduction="mean")(logits, labels) - ce
    assert mean.item() == pytest.approx(ref.item(), rel=1e-12)


def test_mbls_hand_value():
    logits = torch.tensor([[10.0, 0.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0])
    # max - z = (0, 10, 6); ReLU(. - 5) = (0, 5, 1); sum 6, mean 2
    ce = _ce(logits, labels).item()
    assert get_loss("MBLS", margin=5, alpha=0.5)(logits, labels).item() == pytest.approx(ce + 0.5 * 6)
    assert get_loss("MBLS", margin=5, alpha=0.5, convention="reference")(logits, labels).item() == pytest.approx(
        ce + 0.5 * 2
    )


# ----------------------------------------------------------------------------------------- LogitNorm
def test_logitnorm_uses_normalised_logits():
    logits, labels = _batch()
    t = 0.5
    normalised = logits / (t * (logits.norm(dim=1, keepdim=True) + 1e-7))
    assert torch.allclose(normalised.norm(dim=1), torch.full((len(logits),), 1 / t, dtype=torch.float64), atol=1e-6)
    value = get_loss("LOGITNORM", t=t)(logits, labels)
    assert torch.allclose(value, _ce(normalised, labels), atol=1e-12)
    # invariant to the logit scale (up to the 1e-7)
    assert torch.allclose(get_loss("LOGITNORM", t=t)(logits * 7.0, labels), value, atol=1e-6)


def test_logitnorm_t1_caps_binary_confidence_near_080():
    logits = torch.tensor([[100.0, -100.0]], dtype=torch.float64)
    value = get_loss("LOGITNORM")(logits, torch.tensor([0]))
    # normalised logits (1/sqrt2, -1/sqrt2): the best achievable p is sigmoid(sqrt 2) ~ 0.8045
    assert value.item() == pytest.approx(-math.log(1 / (1 + math.exp(-math.sqrt(2)))), abs=1e-6)


# ----------------------------------------------------------------------------------------- ZS-Norm / Penalty
def test_zsnorm_hand_value():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    zs = torch.tensor([[10.0, 20.0, 15.0], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    # row 0: u = (0, 1, 0.5) -> 10 + 10u = (10, 20, 15); row 1: u = (0, 0, 1) -> -1 + 2u = (-1, -1, 1)
    rescaled = torch.tensor([[10.0, 20.0, 15.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    value = get_loss("ECCV_ZS")(logits, labels, zs_logits=zs)
    assert value.item() == pytest.approx(_ce(rescaled, labels).item(), abs=1e-12)


def test_penalty_hand_value():
    logits = torch.tensor([[5.0, -3.0, 0.0]], dtype=torch.float64)
    zs = torch.tensor([[-1.0, 2.0, 1.0]], dtype=torch.float64)
    # ReLU(z - 2) = (3, 0, 0) -> mean 1; ReLU(-1 - z) = (0, 2, 0) -> mean 2/3
    value = get_loss("ECCV_PENALTY")(logits, torch.tensor([0]), zs_logits=zs)
    assert value.item() == pytest.approx(1.0 + 2.0 / 3.0, abs=1e-12)


@pytest.mark.parametrize("name", ["ECCV_ZS", "ECCV_PENALTY"])
def test_zero_shot_losses_refuse_to_run_without_zero_shot_logits(name):
    logits, labels = _batch()
    loss = get_loss(name)
    assert loss.needs == {"zs_logits"}
    with pytest.raises(ValueError, match=f"'{name}' needs zs_logits"):
        loss(logits, labels)
    with pytest.raises(ValueError, match="zs_logits must have the shape"):
        loss(logits, labels, zs_logits=logits[:, :2])


def test_zero_shot_logits_get_no_gradient():
    logits, labels = _batch()
    zs = (logits * 0.3).clone().requires_grad_(True)
    get_loss("ECCV_PENALTY")(logits.requires_grad_(True), labels, zs_logits=zs).backward()
    assert zs.grad is None and logits.grad is not None


# ----------------------------------------------------------------------------------------- MDCA / SMAC
def test_mdca_hand_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]], dtype=torch.float64)  # p = (.25,.75), (.5,.5)
    labels = torch.tensor([0, 0])
    # mean p = (0.375, 0.625), f = (1, 0): (|0.375 - 1| + |0.625 - 0|) / 2 = 0.625
    assert get_loss("MDCA")(logits, labels).item() == pytest.approx(0.625, abs=1e-12)


def test_smac_alpha_zero_equals_mdca():
    logits, labels = _batch()
    assert torch.allclose(get_loss("SMAC", alpha=0.0)(logits, labels), get_loss("MDCA")(logits, labels), atol=1e-12)


def test_smac_is_alpha_invariant_on_a_balanced_batch():
    logits, _ = _batch(n=12, k=3)
    labels = torch.tensor([0, 1, 2] * 4)
    values = [get_loss("SMAC", alpha=a)(logits, labels).item() for a in (0.0, 0.1, 0.3, 0.6)]
    assert max(values) - min(values) < 1e-12
    assert values[0] == pytest.approx(get_loss("MDCA")(logits, labels).item(), abs=1e-12)


def test_smac_depends_on_alpha_on_an_imbalanced_batch():
    logits, _ = _batch(n=12, k=3)
    labels = torch.tensor([0] * 8 + [1] * 3 + [2])
    values = [get_loss("SMAC", alpha=a)(logits, labels).item() for a in (0.0, 0.1, 0.3)]
    assert abs(values[0] - values[1]) > 1e-4 and abs(values[1] - values[2]) > 1e-4


def test_smoothed_frequency_identity():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, 3, 3])
    k, alpha = 4, 0.25
    f = torch.bincount(labels, minlength=k).double() / len(labels)
    s = smoothed_frequencies(labels, k, alpha, torch.float64)
    assert torch.allclose(s, (1 - alpha) * f + alpha * (1 - f) / (k - 1))
    assert s.sum().item() == pytest.approx(1.0)
    # s_c - 1/K = (1 - alpha K / (K - 1)) (f_c - 1/K)
    assert torch.allclose(s - 1 / k, (1 - alpha * k / (k - 1)) * (f - 1 / k), atol=1e-12)
    # s_c is the batch mean of the LS targets q_ic
    q = torch.full((len(labels), k), alpha / (k - 1), dtype=torch.float64)
    q[torch.arange(len(labels)), labels] = 1 - alpha
    assert torch.allclose(s, q.mean(0), atol=1e-12)


def test_smac_binary_is_abs_of_mean_p1_minus_s1():
    logits, _ = _batch(n=6, k=2)
    labels = torch.tensor([0, 1, 1, 1, 1, 0])
    alpha = 0.2
    s1 = 0.8 * (4 / 6) + 0.2 * (2 / 6)
    expected = abs(torch.softmax(logits, 1)[:, 1].mean().item() - s1)
    assert get_loss("SMAC", alpha=alpha)(logits, labels).item() == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------- DCA / MMCE / margin
def test_dca_hand_value():
    logits = torch.tensor([[math.log(9.0), 0.0], [0.0, math.log(3.0)]], dtype=torch.float64)  # conf 0.9, 0.75
    labels = torch.tensor([0, 0])  # first correct, second wrong: accuracy 0.5
    assert get_loss("DCA")(logits, labels).item() == pytest.approx(abs(0.825 - 0.5), abs=1e-12)


def _mmce_hand_case():
    # K = 2; probabilities chosen through log-probability logits
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64))
    labels = torch.tensor([0, 0, 1])  # correct (conf 0.8), correct (conf 0.6), incorrect (conf 0.7)
    return logits, labels


def test_mmce_textbook_and_reference_hand_case():
    logits, labels = _mmce_hand_case()
    k = lambda a, b: math.exp(-abs(a - b) / 0.4)  # noqa: E731  Laplacian kernel, width 0.4
    # correct pairs: (1-r_i)(1-r_j) k = 0.2*0.2*1 + 0.4*0.4*1 + 2 * 0.2*0.4*e^-0.5 = 0.29704491
    cc = 0.04 + 0.16 + 2 * 0.08 * k(0.8, 0.6)
    # incorrect pairs: 0.7 * 0.7 * 1 = 0.49
    ii = 0.49
    # cross pairs: 0.2*0.7*e^-0.25 + 0.4*0.7*e^-0.25 = 0.32709633
    ci = 0.2 * 0.7 * k(0.8, 0.7) + 0.4 * 0.7 * k(0.6, 0.7)
    assert cc == pytest.approx(0.29704491, abs=1e-8) and ci == pytest.approx(0.32709633, abs=1e-8)
    m, n = 2, 1
    textbook = cc / m**2 + ii / n**2 - 2 * ci / (m * n)  # = 0.23716490
    reference = cc / m**2 / (m**2 + 1e-5) + ii / n**2 / (n**2 + 1e-5) - 2 * ci / (m * n) / (m * n + 1e-5)  # 0.34501301
    assert math.sqrt(textbook + 1e-10) == pytest.approx(0.48699579, abs=1e-8)
    assert math.sqrt(reference + 1e-10) == pytest.approx(0.58737808, abs=1e-8)

    std = get_loss("MMCE")(logits, labels).item()
    ref = get_loss("MMCE", convention="reference")(logits, labels).item()
    assert std == pytest.approx(0.48699579, abs=1e-7)
    assert ref == pytest.approx(0.58737808, abs=1e-7)
    assert get_loss("MMCE", normalisation="reference")(logits, labels).item() == pytest.approx(ref, abs=1e-12)


def test_mmce_is_zero_when_all_correct_or_all_wrong():
    logits, _ = _mmce_hand_case()
    all_correct = logits.argmax(1)
    assert get_loss("MMCE")(logits, all_correct).item() == 0.0
    assert get_loss("MMCE")(logits, 1 - all_correct).item() == 0.0


def test_margin_mean_var_hand_value():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    # margins 3 - 2 = 1 and 0 - 2 = -2: mean -0.5, population variance 2.25
    assert get_loss("MARGIN_MEAN_VAR")(logits, labels).item() == pytest.approx(0.05 + 0.0225, abs=1e-12)


# ----------------------------------------------------------------------------------------- dtype
def test_loss_works_in_the_logits_dtype_and_fp16_is_safe():
    logits, labels = _batch(scale=30.0)
    ref = get_loss("LS", alpha=0.1)(logits, labels)
    assert ref.dtype == torch.float64
    half = get_loss("LS", alpha=0.1)(logits.half(), labels)
    assert half.dtype == torch.float16 and torch.isfinite(half)
    assert half.item() == pytest.approx(ref.item(), rel=2e-2)
