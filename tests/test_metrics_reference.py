"""The reference (official-code) convention: Q4, Q5, sklearn quantile bins, ECE-KDE, per-class ECE."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from calibprompt.metrics import (
    ace_reference,
    calibration_metrics,
    calibration_metrics_from_probs,
    ece,
    ece_kde_reference,
    ece_reference,
    kde_bandwidth_reference,
    mce,
    mce_reference,
    per_class_ece_reference,
)
from calibprompt.metrics import reference as reference_module


def rows(conf, correct, k: int = 10):
    """Probability rows whose top-label confidence is conf_i (class 0); label 0 if correct, else 1."""
    conf = np.asarray(conf, dtype=np.float64)
    p = np.repeat(((1.0 - conf) / (k - 1))[:, None], k, axis=1)
    p[:, 0] = conf
    return p, np.where(np.asarray(correct, dtype=bool), 0, 1)


def test_q4_conf_one_adds_weight_but_no_gap():
    # a wrong prediction at conf 1.0 alone in the last bin, 0.65 right in [0.6, 0.7)
    p, y = rows([1.0, 0.65], [0, 1])
    assert ece(p, y) == pytest.approx(0.5 * 1.0 + 0.5 * 0.35, abs=1e-12)  # standard: gap 1 counted
    assert ece_reference(p, y) == pytest.approx(0.5 * 0.0 + 0.5 * 0.35, abs=1e-12)  # reference: weight, no gap
    # mixed last bin: stats from 0.95 (wrong) alone, weight 3/4 from the histogram
    p, y = rows([1.0, 1.0, 0.95, 0.65], [1, 1, 0, 1])
    assert ece(p, y) == pytest.approx(0.75 * abs(2 / 3 - 2.95 / 3) + 0.25 * 0.35, abs=1e-12)  # 0.325
    assert ece_reference(p, y) == pytest.approx(0.75 * 0.95 + 0.25 * 0.35, abs=1e-12)  # 0.8


def test_reference_equals_standard_ece_without_conf_one():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=400)
    y = rng.integers(0, 5, 400)
    assert ece_reference(p, y) == pytest.approx(ece(p, y), abs=1e-12)


def test_q5_mce_is_weighted():
    # bins: [0.3,0.4) 0.35 w | [0.4,0.5) 0.45 r | [0.8,0.9) 0.85 w, 0.82 r | [0.9,1] 0.95 r
    p, y = rows([0.95, 0.85, 0.82, 0.45, 0.35], [1, 0, 1, 1, 0])
    assert mce(p, y) == pytest.approx(0.55, abs=1e-12)
    assert mce_reference(p, y) == pytest.approx(max(0.05 / 5, 2 * 0.335 / 5, 0.55 / 5, 0.35 / 5), abs=1e-12)
    # conf 1.0 is inside [0.9, 1.0] for the official MCE (one assignment there)
    p, y = rows([1.0, 0.65], [0, 1])
    assert mce_reference(p, y) == pytest.approx(0.5 * 1.0)


def test_ace_by_hand_uses_linear_percentile_edges():
    # percentile edges at positions 0, 2, 4, 6 of the sorted values: 0.55 | 0.65 | 0.8 | 0.95, right-open
    p, y = rows([0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95], [1, 0, 1, 0, 1, 1, 0])
    expected = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.675) + 3 * abs(2 / 3 - 2.65 / 3)) / 7  # 1.15 / 7
    assert ace_reference(p, y, 3) == pytest.approx(expected, abs=1e-12)
    m = calibration_metrics_from_probs(p, y, n_bins=3, convention="reference")
    assert m["ace"] == m["adaptive_ece"] == pytest.approx(expected, abs=1e-12)
    assert m["ace_effective_bins"] == 3
    # N = 10, M = 4: linear edges 0.6125, 0.725, 0.8375 give groups of 3, 2, 2, 3 (the inverted-CDF
    # rules sklearn >= 1.9 defaults to would give 2, 3, 2, 3)
    conf = [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]
    p, y = rows(conf, [1, 0, 0, 1, 1, 0, 1, 1, 0, 1])
    expected = (3 * (0.55 - 1 / 3) + 2 * (1 - 0.675) + 2 * (0.775 - 0.5) + 3 * (0.9 - 2 / 3)) / 10  # 0.255
    assert ace_reference(p, y, 4) == pytest.approx(expected, abs=1e-12)


def test_ace_ties_remove_narrow_bins():
    # percentiles of five 0.6 and one 0.9 at 0, 1/3, 2/3, 1: 0.6, 0.6, 0.6, 0.9 -> one bin survives
    p, y = rows([0.6] * 5 + [0.9], [1, 1, 0, 0, 0, 1])
    m = calibration_metrics_from_probs(p, y, n_bins=3, convention="reference")
    assert m["ace_effective_bins"] == 1
    assert m["ace"] == pytest.approx(abs(0.5 - 3.9 / 6), abs=1e-12)
    # an edge within 1e-8 of the previous one is dropped even though a sample sits between them:
    # edges 0.5, 0.7, 0.7 + 4e-9, 0.9 -> 0.5, 0.7, 0.9, so the bins are {0.5} and {0.7, 0.7 + 4e-9, 0.9}
    p, y = rows([0.5, 0.7, 0.7 + 4e-9, 0.9], [1, 0, 1, 1])
    m = calibration_metrics_from_probs(p, y, n_bins=3, convention="reference")
    assert m["ace_effective_bins"] == 2
    assert m["ace"] == pytest.approx(0.25 * 0.5 + 0.75 * abs(2 / 3 - (2.3 + 4e-9) / 3), abs=1e-12)
    # constant confidence: sklearn makes a single bin
    p, y = rows([0.7] * 4, [1, 0, 0, 0])
    assert ace_reference(p, y) == pytest.approx(0.45, abs=1e-12)


def _kbins_ace(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ACE through sklearn's KBinsDiscretizer itself, with linear percentiles fixed explicitly."""
    from sklearn.preprocessing import KBinsDiscretizer

    try:
        kb = KBinsDiscretizer(n_bins=n_bins, encode="ordinal", strategy="quantile",
                              quantile_method="linear", subsample=None)
    except TypeError:  # sklearn < 1.7 has no quantile_method; linear was its only method
        kb = KBinsDiscretizer(n_bins=n_bins, encode="ordinal", strategy="quantile", subsample=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = kb.fit_transform(conf[:, None])[:, 0].astype(int)
    total = 0.0
    for k in np.unique(b):
        s = b == k
        total += abs(correct[s].mean() - conf[s].mean()) * s.sum() / len(conf)
    return total


@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_ace_matches_sklearn_kbinsdiscretizer(decimals):
    # labels drawn from p itself: calibrated in expectation, so bin gaps take both signs and the
    # ACE depends on where the edges fall (an all-overconfident model would hide binning errors)
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4) * 0.6, size=500)
    labels = np.array([rng.choice(4, p=row) for row in p])
    if decimals is not None:  # many ties, so bins get pruned
        top = np.round(p.max(1), decimals)
        p, labels = rows(np.clip(top, 0.3, 1.0), p.argmax(1) == labels)
    conf, correct = p.max(1), (p.argmax(1) == labels).astype(float)
    values = set()
    for m in (5, 10, 15):
        ours = ace_reference(p, labels, m)
        assert ours == pytest.approx(_kbins_ace(conf, correct, m), abs=1e-12)
        values.add(round(ours, 9))
    assert len(values) >= 2  # the bins change the value for these data


def test_ece_kde_by_hand():
    # N = 2: leave-one-out gives each sample the other's correctness
    p, y = rows([0.9, 0.6], [1, 0])
    assert ece_kde_reference(p, y) == pytest.approx((0.9 + 0.4) / 2, abs=1e-6)
    # N = 3, h = 0.3 (N < 100)
    conf, c = [0.9, 0.8, 0.5], [1.0, 1.0, 0.0]
    p, y = rows(conf, c)
    w = lambda a, b: math.exp(-((a - b) ** 2) / (2 * 0.3**2))  # noqa: E731
    acc_hat = [
        sum(w(conf[i], conf[j]) * c[j] for j in range(3) if j != i) / sum(w(conf[i], conf[j]) for j in range(3) if j != i)
        for i in range(3)
    ]
    expected = sum(abs(conf[i] - acc_hat[i]) for i in range(3)) / 3
    assert ece_kde_reference(p, y) == pytest.approx(expected, abs=1e-6)


def test_ece_kde_bandwidth_rule_and_chunking(monkeypatch):
    assert [kde_bandwidth_reference(n) for n in (99, 100, 499, 500, 1999, 2000)] == [0.3, 0.2, 0.2, 0.1, 0.1, 0.05]
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(3) * 0.5, size=150)
    y = rng.integers(0, 3, 150)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(float)
    d = conf[:, None] - conf[None, :]
    k = np.exp(-(d**2) / (2 * 0.2**2))
    np.fill_diagonal(k, 0.0)
    naive = np.mean(np.abs(conf - (k / k.sum(1, keepdims=True)) @ correct))  # float64 oracle
    one_chunk = ece_kde_reference(p, y)
    assert one_chunk == pytest.approx(naive, abs=1e-5)
    monkeypatch.setattr(reference_module, "_KDE_CHUNK_ELEMENTS", 150 * 7)  # 7 rows per chunk
    assert ece_kde_reference(p, y) == pytest.approx(one_chunk, abs=1e-6)


def test_per_class_reference_means_and_nan():
    # class 0: samples 0,1 (y=0); class 1: samples 2,3 (y=1). Predictions: 0, 0, 0, 0 (class 1 never predicted)
    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.8, 0.2]])
    y = np.array([0, 0, 1, 1])
    out = per_class_ece_reference(p, y)
    gt0 = 0.5 * 0.1 + 0.5 * 0.3  # both right, separate bins
    gt1 = 0.5 * 0.6 + 0.5 * 0.8  # both wrong
    assert out["gt_ece"] == pytest.approx([gt0, gt1])
    assert out["mean_gt_ece"] == pytest.approx((gt0 + gt1) / 2)
    assert math.isnan(out["pred_ece"][1]) and math.isnan(out["mean_pred_ece"])  # as the official code
    m = calibration_metrics_from_probs(p, y, convention="reference")
    assert math.isnan(m["mean_pred_ece"]) and m["mean_gt_ece"] == pytest.approx((gt0 + gt1) / 2)
    assert m["macro_f1"] == pytest.approx((2 * 2 / (2 * 2 + 2)) / 2)  # labels = unique(y) = {0, 1}


def test_reference_keys_and_fp16_conf_one():
    import torch
    # fp16 logits with a gap of 40 give conf == 1.0 exactly in float64 softmax
    z = torch.tensor([[40.0, 0.0], [40.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float16)
    y = torch.tensor([1, 0, 1, 0])
    ref = calibration_metrics(z, y, convention="reference")
    std = calibration_metrics(z, y)
    for key in ("ece_kde", "ece_kde_reference", "mean_gt_ece", "mean_pred_ece"):
        assert key in ref and key not in std
    assert ref["ece_kde"] == ref["ece_kde_reference"]
    c3 = 1 / (1 + math.exp(-1.0))  # 0.731, right; c4 = 1 / (1 + e^-2) = 0.881, right
    c4 = 1 / (1 + math.exp(-2.0))
    # standard: [0.9,1]: two at 1.0 (one wrong) -> gap 0.5, w 1/2; c3 -> bin 7, c4 -> bin 8
    assert std["ece"] == pytest.approx(0.5 * 0.5 + 0.25 * (1 - c3) + 0.25 * (1 - c4), abs=1e-12)
    # reference: the last bin has weight 1/2 but no statistics
    assert ref["ece"] == pytest.approx(0.25 * (1 - c3) + 0.25 * (1 - c4), abs=1e-12)
