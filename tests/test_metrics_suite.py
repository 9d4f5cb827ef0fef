"""calibration_metrics contract, input validation, bootstrap, selective prediction, reliability diagrams."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.special import softmax

from calibprompt.metrics import (
    bootstrap_ci,
    calibration_metrics,
    calibration_metrics_from_probs,
    classwise_reliability_diagram,
    metric_names,
    reliability_diagram,
    risk_coverage_curve,
    selective_metrics,
)

STANDARD_KEYS = {
    "accuracy", "macro_f1", "confidence", "ece", "mce", "ace", "adaptive_ece", "nll", "brier",
    "classwise_ece", "smece", "n_bins", "convention", "closed", "ace_effective_bins", "n_samples", "n_classes",
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 4, 300)
    z = (rng.normal(size=(300, 4)) + 1.2 * np.eye(4)[y]) * 2.5
    return z, y


def test_contract_keys_types_and_fractions(data):
    z, y = data
    m = calibration_metrics(z, y)
    assert set(m) == STANDARD_KEYS
    assert m["convention"] == "standard" and m["n_bins"] == 10 and m["closed"] == "left"
    assert type(m["ace_effective_bins"]) is int and m["ace_effective_bins"] == 10
    for key in metric_names("standard"):
        assert type(m[key]) is float, key
    for key in ("accuracy", "macro_f1", "confidence", "ece", "mce", "ace", "classwise_ece", "smece"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["ace"] == m["adaptive_ece"]
    ref = calibration_metrics(z, y, convention="reference")
    assert set(ref) == STANDARD_KEYS | {"ece_kde", "ece_kde_reference", "mean_gt_ece", "mean_pred_ece"}
    assert json.loads(json.dumps(ref)) == ref  # plain Python values only


def test_torch_inputs_and_probs_entry_point(data):
    import torch
    z, y = data
    m = calibration_metrics(z, y)
    assert calibration_metrics(torch.tensor(z), torch.tensor(y)) == m
    # float32 logits are widened exactly, then softmaxed in float64
    m32 = calibration_metrics(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    assert m32 == calibration_metrics(z.astype(np.float32).astype(np.float64), y)
    mp = calibration_metrics_from_probs(softmax(z, axis=1), y)
    for key in metric_names("standard"):
        assert mp[key] == pytest.approx(m[key], abs=1e-12), key


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (np.zeros(5), np.zeros(5, int), "shape \\(N, K\\)"),
        (np.zeros((5, 1)), np.zeros(5, int), "K >= 2"),
        (np.zeros((0, 3)), np.zeros(0, int), "N = 0"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]), "NaN or inf"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), np.array([0, 1]), "NaN or inf"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), "must lie in \\[0, 1\\]"),
        (np.zeros((3, 2)), np.array([0, -1, 1]), "must lie in \\[0, 1\\]"),
        (np.zeros((3, 2)), np.array([0, 1]), "must match"),
        (np.zeros((3, 2)), np.array([[0], [1], [1]]), "reshape\\(-1\\)"),
        (np.zeros((3, 2)), np.array([0.0, 0.5, 1.0]), "integer class indices"),
    ],
)
def test_input_errors_name_the_argument(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        calibration_metrics(logits, labels)


def test_option_errors(data):
    z, y = data
    with pytest.raises(ValueError, match="'standard', 'reference'"):
        calibration_metrics(z, y, convention="official")
    with pytest.raises(ValueError, match="closed='middle'"):
        calibration_metrics(z, y, closed="middle")
    with pytest.raises(ValueError, match="standard convention only"):
        calibration_metrics(z, y, convention="reference", closed="right")
    with pytest.raises(ValueError, match="positive integer"):
        calibration_metrics(z, y, n_bins=0)
    with pytest.raises(ValueError, match="sum to 1"):
        calibration_metrics_from_probs(np.full((3, 2), 0.4), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="pass logits"):
        calibration_metrics_from_probs(z, y)


def test_bootstrap_matches_manual_resampling(data):
    z, y = data
    out = bootstrap_ci(["accuracy", "ece"], z, y, n_resamples=60, seed=3, level=0.9)
    rng = np.random.default_rng(3)
    acc, ece_vals = [], []
    for _ in range(60):
        i = rng.integers(0, len(y), len(y))
        m = calibration_metrics(z[i], y[i])
        acc.append(m["accuracy"])
        ece_vals.append(m["ece"])
    assert out["accuracy"] == pytest.approx(tuple(np.percentile(acc, [5, 95])), abs=1e-12)
    assert out["ece"] == pytest.approx(tuple(np.percentile(ece_vals, [5, 95])), abs=1e-12)
    assert bootstrap_ci(["accuracy", "ece"], z, y, n_resamples=60, seed=3, level=0.9) == out
    assert bootstrap_ci(["accuracy"], z, y, n_resamples=60, seed=4, level=0.9)["accuracy"] != out["accuracy"]


def test_bootstrap_all_metrics_and_callables(data):
    z, y = data
    out = bootstrap_ci(None, z[:80], y[:80], n_resamples=20)
    assert set(out) == set(metric_names("standard"))
    assert all(lo <= hi for lo, hi in out.values())
    ones = bootstrap_ci(lambda s, t: float(np.mean(s.argmax(1) == s.argmax(1))), z, y, n_resamples=5)
    assert ones == {"metric": (1.0, 1.0)}
    two = bootstrap_ci(lambda s, t: {"n": float(len(t)), "k": float(s.shape[1])}, z, y, n_resamples=5)
    assert two == {"n": (300.0, 300.0), "k": (4.0, 4.0)}
    with pytest.raises(ValueError, match="valid names"):
        bootstrap_ci(["ece_kde"], z, y, n_resamples=5)  # reference-only metric
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci("ece", z, y, level=95)


def test_bootstrap_drops_nan_resamples():
    # mean_pred_ece is NaN whenever class 1 is never predicted in a resample
    p = np.array([[0.9, 0.1]] * 9 + [[0.2, 0.8]])
    y = np.array([0] * 5 + [1] * 5)
    out = bootstrap_ci(["mean_pred_ece"], p, y, n_resamples=40, inputs="probs", convention="reference")
    lo, hi = out["mean_pred_ece"]
    assert not math.isnan(lo) and lo <= hi


def test_selective_by_hand():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    y = np.array([0, 1, 0, 1])  # right, wrong, right, wrong by decreasing confidence
    m = selective_metrics(p, y, inputs="probs")
    assert m["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert m["eaurc"] == pytest.approx(m["aurc"] - (0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert m["accuracy_at_90_coverage"] == 0.5 and m["coverage_at_90"] == 1.0
    # ties are accepted together, whatever their order
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    for y in (np.array([0, 1, 0, 0]), np.array([1, 0, 0, 0])):
        curve = risk_coverage_curve(p, y, inputs="probs")
        assert curve.coverage.tolist() == [0.5, 1.0] and curve.risk.tolist() == [0.5, 0.25]
        assert selective_metrics(p, y, inputs="probs")["aurc"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    # unequal tie groups: points (0.75, 1/3) and (1.0, 1/4); AURC is the step integral, not a mean
    p = np.array([[0.9, 0.1]] * 3 + [[0.5, 0.5]])
    m = selective_metrics(p, np.array([1, 0, 0, 0]), inputs="probs")
    assert m["aurc"] == pytest.approx(0.75 / 3 + 0.25 * 0.25)
    assert m["accuracy_at_90_coverage"] == 0.75 and m["coverage_at_90"] == 1.0


def test_accuracy_at_90_coverage_without_ties(data):
    z, y = data
    p = softmax(z, axis=1)
    keep = np.argsort(-p.max(1))[:270]  # the 90 % most confident of 300
    m = selective_metrics(z, y)
    assert m["coverage_at_90"] == pytest.approx(0.9)
    assert m["accuracy_at_90_coverage"] == pytest.approx(np.mean(p[keep].argmax(1) == y[keep]))


def test_reliability_diagram_files_and_data(tmp_path):
    # bins: [0.9,1]: 1.0 right, 1.0 wrong; [0.6,0.7): 0.65 right
    p = np.array([[1.0, 0.0], [1.0, 0.0], [0.65, 0.35]])
    y = np.array([0, 1, 0])
    data = reliability_diagram(p, y, tmp_path / "rel.png", title="test", inputs="probs")
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "rel.json").read_text())
    assert on_disk["ece"] == pytest.approx(data["ece"]) == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.35)
    bins = on_disk["bins"]
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 2]
    assert bins[9]["accuracy"] == 0.5 and bins[9]["mean_confidence"] == 1.0 and bins[9]["hi"] == 1.0
    assert sum(on_disk["confidence_histogram"]["counts"]) == 3
    ref = reliability_diagram(p, y, tmp_path / "ref.png", inputs="probs", convention="reference")
    assert ref["bins"][9]["count"] == 2 and ref["bins"][9]["count_in_statistics"] == 0
    assert ref["ece"] == pytest.approx(1 / 3 * 0.35)
    with pytest.raises(ValueError, match=".png"):
        reliability_diagram(p, y, tmp_path / "rel.json", inputs="probs")


def test_classwise_diagram(tmp_path, data):
    z, y = data
    out = classwise_reliability_diagram(z, y, tmp_path / "cw.png", class_names=["a", "b", "c", "d"])
    assert (tmp_path / "cw.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "cw.json").read_text())
    assert [c["name"] for c in on_disk["classes"]] == ["a", "b", "c", "d"]
    assert on_disk["classwise_ece"] == pytest.approx(calibration_metrics(z, y)["classwise_ece"], abs=1e-12)
    assert out["classes"][2]["bins"][0]["count"] == sum(1 for v in softmax(z, 1)[:, 2] if v < 0.1)
    with pytest.raises(ValueError, match="class_names"):
        classwise_reliability_diagram(z, y, tmp_path / "x.png", class_names=["a"])
