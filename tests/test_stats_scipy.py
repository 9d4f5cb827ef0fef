"""Statistics through scipy: paired per-seed intervals (ttest_rel) with a Wilcoxon p-value, and the
bootstrap of metrics.bootstrap (scipy.stats.bootstrap, BCa available)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from calibprompt.metrics import bootstrap_ci, calibration_metrics
from calibprompt.reporting.stats import paired_differences, paired_test, t_interval, verdict


def test_paired_test_is_scipy_ttest_rel_and_wilcoxon():
    a = np.array([0.031, 0.027, 0.040, 0.025, 0.030])
    b = np.array([0.052, 0.049, 0.047, 0.061, 0.044])
    out = paired_test(a, b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert out["ci"] == pytest.approx((ci.low, ci.high), abs=1e-15)
    # hand check: mean -0.02, t(0.975, 4) = 2.776445
    d = a - b
    half = 2.7764451051977987 * d.std(ddof=1) / np.sqrt(5)
    assert out["ci"] == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    assert out["wilcoxon_p"] == pytest.approx(0.0625)  # all 5 differences negative: the exact minimum
    assert t_interval(d) == pytest.approx(out["ci"], abs=1e-15)
    assert np.isnan(paired_test(a, a)["wilcoxon_p"]) and paired_test(a, a)["ci"] == (0.0, 0.0)
    assert np.isnan(paired_test(a[:1], b[:1])["ci"][0])


def test_paired_differences_carry_the_wilcoxon_p_into_the_verdict():
    seeds = [1, 2, 3, 4, 5]
    ece = {"ref": [0.05, 0.06, 0.05, 0.07, 0.04], "cal": [0.03, 0.03, 0.04, 0.04, 0.02]}
    results = {label: {s: {"result": {"metrics": {"ece": e, "accuracy": 0.8, "nll": 0.5, "adaptive_ece": e}}}
                       for s, e in zip(seeds, vals)} for label, vals in ece.items()}
    methods = [{"label": "ref", "method": {"name": "coop-ce"}}, {"label": "cal", "method": {"name": "calibprompt"}}]
    (rec,) = paired_differences(methods, results, "ref", seeds)
    assert rec["ece"]["wilcoxon_p"] == pytest.approx(stats.wilcoxon(ece["cal"], ece["ref"]).pvalue)
    assert rec["ece"]["ci95"][1] < 0
    assert "Wilcoxon p = 0.0625" in verdict(rec["ece"], rec["accuracy"])


def test_bootstrap_bca_is_scipys():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    z = rng.normal(0, 1, (200, 3))
    z[np.arange(200), y] += 1.0
    ours = bootstrap_ci(["accuracy"], z, y, n_resamples=300, seed=5, method="BCa")
    correct = (z.argmax(1) == y).astype(float)
    import inspect

    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"  # scipy < 1.15
    ref = stats.bootstrap((correct,), np.mean, n_resamples=300, method="BCa", **{key: np.random.default_rng(5)})
    # the same index stream and statistic: accuracy of the rows is the mean of their correctness
    assert ours["accuracy"] == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=1e-12)
    pct = bootstrap_ci(["accuracy"], z, y, n_resamples=300, seed=5)
    assert pct != ours  # BCa corrects the percentile interval
    assert pct["accuracy"][0] < calibration_metrics(z, y)["accuracy"] < pct["accuracy"][1]
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci(["accuracy"], z, y, method="bca-ish")
