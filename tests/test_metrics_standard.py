"""Standard-convention metrics on hand-computed cases (expected numbers worked out by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibprompt.metrics import (
    accuracy,
    adaptive_ece,
    brier,
    calibration_metrics_from_probs,
    classwise_ece,
    confidence,
    ece,
    macro_f1,
    mce,
    nll,
)
from calibprompt.metrics.binning import equal_mass_index, equal_width_index, width_edges


def rows(conf, correct, k: int = 10):
    """Probability rows whose top-label confidence is conf_i (class 0); label 0 if correct, else 1."""
    conf = np.asarray(conf, dtype=np.float64)
    p = np.repeat(((1.0 - conf) / (k - 1))[:, None], k, axis=1)
    p[:, 0] = conf
    return p, np.where(np.asarray(correct, dtype=bool), 0, 1)


# bins: [0.3,0.4) 0.35 wrong | [0.4,0.5) 0.45 right | [0.8,0.9) 0.85 wrong, 0.82 right | [0.9,1] 0.95 right
FIVE = rows([0.95, 0.85, 0.82, 0.45, 0.35], [1, 0, 1, 1, 0])


def test_ece_and_mce_by_hand_with_empty_bins():
    # gaps 0.05 (w 1/5), |0.5 - 0.835| = 0.335 (w 2/5), 0.55 (w 1/5), 0.35 (w 1/5); six bins empty
    assert ece(*FIVE) == pytest.approx((0.05 + 2 * 0.335 + 0.55 + 0.35) / 5, abs=1e-12)  # 0.324
    assert mce(*FIVE) == pytest.approx(0.55, abs=1e-12)  # unweighted, empty bins ignored
    assert accuracy(*FIVE) == pytest.approx(0.6)
    assert confidence(*FIVE) == pytest.approx((0.95 + 0.85 + 0.82 + 0.45 + 0.35) / 5)


def test_conf_one_joins_the_closed_last_bin():
    # [0.9, 1]: 1.0 right, 1.0 right, 0.95 wrong -> acc 2/3, conf 2.95/3; [0.6, 0.7): 0.65 right
    p, y = rows([1.0, 1.0, 0.95, 0.65], [1, 1, 0, 1])
    assert ece(p, y) == pytest.approx(0.75 * abs(2 / 3 - 2.95 / 3) + 0.25 * 0.35, abs=1e-12)  # 0.325
    # a wrong prediction at conf 1.0 alone in the last bin: gap 1
    p, y = rows([1.0, 0.65], [0, 1])
    assert ece(p, y) == pytest.approx(0.5 * 1.0 + 0.5 * 0.35, abs=1e-12)
    assert mce(p, y) == pytest.approx(1.0)


def test_confidences_on_edges_left_and_right_closed():
    edges = width_edges(10)
    assert edges[3] == 0.1 * 3 != 0.3  # linspace edges are k * 0.1, so the literal 0.3 lies below edge 3
    conf = np.array([edges[k] for k in range(11)])
    assert equal_width_index(conf, 10, "left").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    assert equal_width_index(conf, 10, "right").tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert equal_width_index(np.array([0.3, 0.6, 0.7]), 10, "left").tolist() == [2, 5, 6]
    # 0.5 right, 0.55 wrong: same bin [0.5, 0.6) when left-closed, split (0.4,0.5] | (0.5,0.6] when right-closed
    p, y = rows([0.5, 0.55], [1, 0])
    assert ece(p, y) == pytest.approx(abs(0.5 - 0.525), abs=1e-12)
    assert ece(p, y, closed="right") == pytest.approx(0.5 * 0.5 + 0.5 * 0.55, abs=1e-12)
    assert mce(p, y, closed="right") == pytest.approx(0.55, abs=1e-12)


def test_all_samples_in_one_bin():
    conf = [0.71, 0.72, 0.74, 0.78]
    p, y = rows(conf, [1, 1, 1, 0])
    gap = abs(0.75 - np.mean(conf))  # 0.0125
    assert ece(p, y) == pytest.approx(gap, abs=1e-12)
    assert mce(p, y) == pytest.approx(gap, abs=1e-12)
    # equal-mass with 10 bins on 4 distinct values: four singleton groups
    assert adaptive_ece(p, y) == pytest.approx((0.29 + 0.28 + 0.26 + 0.78) / 4, abs=1e-12)


def test_adaptive_ece_group_sizes_follow_array_split():
    # sorted 0.55 r, 0.6 w, 0.65 r | 0.7 w, 0.8 r | 0.9 r, 0.95 w  (sizes 3, 2, 2)
    p, y = rows([0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95], [1, 0, 1, 0, 1, 1, 0])
    expected = (3 * abs(2 / 3 - 0.6) + 2 * abs(0.5 - 0.75) + 2 * abs(0.5 - 0.925)) / 7  # 1.55 / 7
    assert adaptive_ece(p, y, 3) == pytest.approx(expected, abs=1e-12)


def test_equal_mass_ties_are_never_split():
    s = np.array([0.6, 0.6, 0.6, 0.7, 0.7, 0.9])  # cuts at 2 and 4 both fall inside tie runs
    assert equal_mass_index(s, 3).tolist() == [0, 0, 0, 1, 1, 2]
    s = np.array([0.9, 0.6, 0.6, 0.6, 0.6, 0.6])  # both cuts move to the end of the 0.6 run: 2 groups
    assert equal_mass_index(s, 3).tolist() == [1, 0, 0, 0, 0, 0]
    # order of tied samples does not matter
    perm = np.array([3, 0, 5, 1, 4, 2])
    assert equal_mass_index(s[perm], 3).tolist() == equal_mass_index(s, 3)[perm].tolist()
    p, y = rows([0.6] * 5 + [0.9], [1, 1, 0, 0, 0, 1])
    m = calibration_metrics_from_probs(p, y, n_bins=3)
    assert m["ace_effective_bins"] == 2
    assert m["adaptive_ece"] == pytest.approx(5 / 6 * abs(0.4 - 0.6) + 1 / 6 * 0.1, abs=1e-12)
    assert m["ace"] == m["adaptive_ece"]


def test_classwise_ece_by_hand():
    p = np.array([[0.8, 0.2], [0.85, 0.15], [0.35, 0.65], [0.25, 0.75]])
    y = np.array([0, 1, 1, 0])
    # class 0: [0.8,0.9): 0.8 (y=1), 0.85 (y=0) -> |0.5 - 0.825|; 0.35 (0) -> 0.35; 0.25 (1) -> 0.75
    c0 = (2 * 0.325 + 0.35 + 0.75) / 4
    # class 1: [0.1,0.2): 0.15 (y=1), [0.2,0.3): 0.2 (0); [0.6,0.7): 0.65 (1); [0.7,0.8): 0.75 (0)
    c1 = (0.85 + 0.2 + 0.35 + 0.75) / 4
    assert classwise_ece(p, y) == pytest.approx((c0 + c1) / 2, abs=1e-12)


def test_nll_brier_binary_by_hand():
    p = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    y = np.array([0, 0, 1])
    assert nll(p, y) == pytest.approx(-(math.log(0.9) + math.log(0.3) + math.log(0.4)) / 3, abs=1e-12)
    assert brier(p, y) == pytest.approx((2 * 0.01 + 2 * 0.49 + 2 * 0.36) / 3, abs=1e-12)  # sum over classes
    # p = 0 for the true class is clipped at 1e-12
    assert nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_single_class_present_macro_f1():
    # only class 0 in the labels; predictions 0, 0, 1 with K = 3
    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    y = np.array([0, 0, 0])
    # class 0: tp 2, fn 1 -> F1 = 4/5; class 1: fp 1 -> 0; class 2: never seen -> 0
    assert macro_f1(p, y) == pytest.approx(0.8 / 3)
    assert macro_f1(p, y, classes="present") == pytest.approx(0.8)
    m = calibration_metrics_from_probs(p, y)
    assert m["macro_f1"] == pytest.approx(0.8 / 3)
    assert calibration_metrics_from_probs(p, y, convention="reference")["macro_f1"] == pytest.approx(0.8)
    # classwise: class 2 has p = 0.1 everywhere against 0 -> 0.1; class 1: 0.2,0.3 vs 0 and 0.7 vs 0
    assert m["classwise_ece"] == pytest.approx((abs(1 - 0.65) * 2 / 3 + 0.8 / 3 + (0.2 + 0.3 + 0.7) / 3 + 0.1) / 3)


def test_binary_two_columns():
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.45, 0.55], [0.7, 0.3]])
    y = np.array([0, 1, 0, 1])
    m = calibration_metrics_from_probs(p, y)
    # conf 0.9 r | 0.8 r | 0.55 w | 0.7 w, each alone in its bin
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.55 + 0.7) / 4)
    assert m["accuracy"] == 0.5
    assert m["brier"] == pytest.approx(2 * np.mean((p[:, 1] - y) ** 2))  # twice the binary Brier


def test_right_closed_matches_left_when_no_value_on_an_edge():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(4) * 0.7, size=300)
    y = np.array([rng.choice(4, p=row) for row in p])  # calibrated: bin gaps of both signs
    for fn in (ece, mce, classwise_ece):
        assert fn(p, y, closed="right") == pytest.approx(fn(p, y), abs=1e-12)
    assert ece(p, y, 10) != pytest.approx(ece(p, y, 7), abs=1e-6)  # binning matters for these data
