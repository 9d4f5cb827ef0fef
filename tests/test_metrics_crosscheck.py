"""Cross-checks against independent libraries where they define the same quantity.

| library                  | quantity                                   | ours                         | tol   |
| netcal ECE(bins)         | equal-width top-label ECE                  | ece (standard, left-closed)  | 1e-12 |
| netcal MCE(bins)         | unweighted max gap                          | mce (standard)               | 1e-12 |
| netcal ECE(equal_intervals=False) | equal-mass ECE, np.quantile edges  | ace_reference (no ties)      | 1e-12 |
| torchmetrics l1 / max    | ECE / MCE in float32                       | ece / mce                    | 1e-6  |
| relplot smECE            | SmoothECE                                   | smooth_ece                   | 1e-12 |
| uncertainty-calibration  | get_ece (top-label, marginal): (a, b] bins | ece / classwise_ece, right   | 1e-12 |
|                          | get_ece_em: equal-mass, ties kept together | adaptive_ece                 | 1e-12 |
| sklearn                  | f1_score macro, log_loss, accuracy         | macro_f1, nll, accuracy      | 1e-12 |
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from calibprompt.metrics import (
    ace_reference,
    adaptive_ece,
    calibration_metrics,
    classwise_ece,
    ece,
    macro_f1,
    mce,
    smooth_ece,
)
from tests.conftest import require_shared


@pytest.fixture(scope="module")
def breast_logits():
    """Logits of a logistic regression on raw pixels of BreastMNIST (train -> test): real, overconfident."""
    from sklearn.linear_model import LogisticRegression

    path = require_shared("medmnist/breastmnist.npz")
    with np.load(path, allow_pickle=False) as d:
        xtr = d["train_images"].reshape(len(d["train_images"]), -1) / 255.0
        xte = d["test_images"].reshape(len(d["test_images"]), -1) / 255.0
        ytr, yte = d["train_labels"].reshape(-1), d["test_labels"].reshape(-1)
    clf = LogisticRegression(C=0.05, max_iter=3000).fit(xtr, ytr)
    z = clf.decision_function(xte)
    return np.stack([np.zeros_like(z), z], axis=1), yte.astype(np.int64)


@pytest.fixture(scope="module")
def multiclass():
    """Synthetic 6-class logits with a temperature that makes them overconfident."""
    rng = np.random.default_rng(7)
    n, k = 800, 6
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    return z * 2.0, y


def _cases(breast_logits, multiclass):
    return [("breastmnist", *breast_logits), ("synthetic6", *multiclass)]


def test_realistic_logits_are_informative(breast_logits):
    z, y = breast_logits
    m = calibration_metrics(z, y)
    assert len(y) == 156 and 0.6 < m["accuracy"] < 0.95
    assert m["ece"] > 0.01  # a miscalibrated model, so the cross-checks compare non-trivial numbers


def test_netcal_equal_width_and_equal_mass(breast_logits, multiclass):
    from netcal.metrics import ECE, MCE

    for _, z, y in _cases(breast_logits, multiclass):
        p = softmax(z, axis=1)
        # netcal reads (N, 2) as positive-class calibration, so give it the top-label pairs
        # (confidence, correctness) directly; it then bins conf against correctness
        conf, correct = p.max(1), (p.argmax(1) == y).astype(np.int64)
        for m in (5, 10, 15):
            assert ece(p, y, m) == pytest.approx(ECE(bins=m).measure(conf, correct), abs=1e-12)
            assert mce(p, y, m) == pytest.approx(MCE(bins=m).measure(conf, correct), abs=1e-12)
            # netcal's equal-mass bins use np.quantile edges with [a, b) bins: the official ACE
            netcal_em = ECE(bins=m, equal_intervals=False).measure(conf, correct)
            assert ace_reference(p, y, m) == pytest.approx(netcal_em, abs=1e-12)
    z, y = multiclass  # multi-class input the usual way
    p = softmax(z, axis=1)
    assert ece(p, y) == pytest.approx(ECE(bins=10).measure(p, y), abs=1e-12)


def test_torchmetrics_l1_and_max(breast_logits, multiclass):
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    for _, z, y in _cases(breast_logits, multiclass):
        p32 = softmax(z, axis=1).astype(np.float32)
        conf = p32.max(1).astype(np.float64)
        edges = np.linspace(0, 1, 11)
        # torchmetrics bins in float32 and sends conf = 1.0 to a phantom bin: keep clear of both
        keep = (np.abs(conf[:, None] - edges[None, :]).min(1) > 1e-5) & (conf < 1.0)
        p32, yk = p32[keep], y[keep]
        p64 = p32.astype(np.float64)
        k = p32.shape[1]
        for norm, ours in (("l1", ece), ("max", mce)):
            metric = MulticlassCalibrationError(num_classes=k, n_bins=10, norm=norm)
            theirs = float(metric(torch.from_numpy(p32), torch.from_numpy(yk)))
            assert ours(p64, yk) == pytest.approx(theirs, abs=1e-6)


def test_relplot_smece(breast_logits, multiclass):
    import relplot
    for _, z, y in _cases(breast_logits, multiclass):
        p = softmax(z, axis=1)
        f, c = p.max(1), (p.argmax(1) == y).astype(float)
        value, sigma = smooth_ece(p, y, return_sigma=True)
        theirs, their_sigma = relplot.smECE(f, c, return_width=True)
        assert sigma == their_sigma
        assert value == pytest.approx(theirs, abs=1e-12)
    # a tiny and a perfectly calibrated-looking case, where the bandwidth floor matters
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    y = np.array([0, 0, 1])
    assert smooth_ece(p, y) == pytest.approx(relplot.smECE(p.max(1), (p.argmax(1) == y) * 1.0), abs=1e-12)


def test_uncertainty_calibration(breast_logits, multiclass):
    cal = pytest.importorskip("calibration", reason="pip install uncertainty-calibration")
    for _, z, y in _cases(breast_logits, multiclass):
        p = softmax(z, axis=1)
        for m in (5, 10, 15):
            # naming trap: get_ece uses get_equal_prob_bins, which are equal-*width* bins, (a, b]
            assert ece(p, y, m, closed="right") == pytest.approx(cal.get_ece(p, y, num_bins=m), abs=1e-12)
            assert classwise_ece(p, y, m, closed="right") == pytest.approx(
                cal.get_ece(p, y, num_bins=m, mode="marginal"), abs=1e-12
            )
            # get_ece_em uses get_equal_bins, the equal-*mass* bins
            assert adaptive_ece(p, y, m) == pytest.approx(cal.get_ece_em(p, y, num_bins=m), abs=1e-12)


def test_uncertainty_calibration_equal_mass_with_ties():
    cal = pytest.importorskip("calibration", reason="pip install uncertainty-calibration")
    rng = np.random.default_rng(5)
    top = np.round(rng.uniform(0.4, 1.0, 300), 1)  # heavy ties, including 1.0
    correct = rng.uniform(size=300) < top
    p = np.repeat(((1 - top) / 4)[:, None], 5, axis=1)
    p[:, 0] = top
    y = np.where(correct, 0, 1)
    for m in (3, 7, 10, 20):
        assert adaptive_ece(p, y, m) == pytest.approx(cal.get_ece_em(p, y, num_bins=m), abs=1e-12)


def test_sklearn_f1_nll_accuracy(breast_logits, multiclass):
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    for _, z, y in _cases(breast_logits, multiclass):
        p = softmax(z, axis=1)
        pred = p.argmax(1)
        k = p.shape[1]
        m = calibration_metrics(z, y)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        assert m["nll"] == pytest.approx(log_loss(y, p, labels=list(range(k))), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=list(range(k))), abs=1e-12)
    # classes only predicted: reference ignores them, standard counts them (sklearn zero_division -> 0)
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    p = np.eye(3)[pred] * 0.8 + 0.2 / 3 * (1 - np.eye(3)[pred]) * 1.5
    assert macro_f1(p, y) == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1, 2]))
    assert macro_f1(p, y, classes="present") == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1]))
