"""Ablation reports: the axis is found, the rows carry mean, std and the 95% t-interval over seeds, the CSV
and the figure are written (a real PNG), and the HTML report shows it."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from scipy import stats

from calibprompt.reporting.ablation import ablation_axis, ablation_csv, ablation_plot, ablation_rows
from calibprompt.reporting.collect import Collection, Group
from calibprompt.reporting.html import html_report


def _group(method: str, shots: int, variant: str, acc: list[float], ece: list[float]) -> Group:
    g = Group(shots, "BiomedCLIP", "COVID", method, variant)
    g.seeds = list(range(1, len(acc) + 1))
    g.values = {"accuracy": acc, "ece": ece}
    return g


def _collection(groups: list[Group]) -> Collection:
    return Collection({"name": "ablation"}, groups, [], {"done": len(groups), "planned": len(groups)}, "standard")


def test_context_length_axis_rows_and_intervals():
    groups = [_group(m, 8, f"prompt.n_ctx={n}", [0.7 + n / 100, 0.72 + n / 100, 0.71 + n / 100], [0.1, 0.12, 0.08])
              for m in ("coop-ce", "calibprompt") for n in (4, 8, 16)]
    coll = _collection(groups)
    assert ablation_axis(coll) == "prompt.n_ctx"
    rows = ablation_rows(coll, "prompt.n_ctx")
    assert len(rows) == 6 and [r["value"] for r in rows[:3]] == [4.0, 8.0, 16.0]
    row = rows[0]  # calibprompt, n_ctx 4 (sorted by method, then value)
    acc = np.array([0.74, 0.76, 0.75])
    half = stats.t.ppf(0.975, 2) * acc.std(ddof=1) / np.sqrt(3)
    assert row["method"] == "calibprompt" and row["accuracy_mean"] == pytest.approx(0.75)
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == (pytest.approx(0.75 - half), pytest.approx(0.75 + half))
    assert row["ece_std"] == pytest.approx(0.02) and row["n"] == 3
    parsed = list(csv.DictReader(io.StringIO(ablation_csv(rows))))
    assert len(parsed) == 6 and float(parsed[0]["accuracy_mean"]) == pytest.approx(0.75)


def test_shots_axis_and_sweeps_that_are_not_ablations(tmp_path):
    shots = _collection([_group("coop-ce", s, "", [0.6 + s / 100] * 2, [0.2, 0.1]) for s in (1, 2, 4)])
    assert ablation_axis(shots) == "shots"
    rows = ablation_rows(shots, "shots")
    assert ablation_plot(rows, tmp_path / "a.png", "title")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = html_report([], shots, {"ablation": [("shots", "a.png", "BiomedCLIP · COVID")]}, embed=tmp_path)
    assert "Ablation: accuracy and ECE against shots" in html and "data:image/png;base64," in html
    two_keys = _collection([_group("coop-ce", 8, f"alpha={a}, train.lr={lr}", [0.7], [0.1])
                            for a in (0.1, 0.2) for lr in (0.1, 0.2)])
    assert ablation_axis(two_keys) is None  # two axes at once: not a one-axis ablation
    assert ablation_axis(_collection([_group("coop-ce", 8, "", [0.7], [0.1])])) is None


def _cell(backbone: str, dataset: str, groups: dict[str, tuple[list[float], list[float]]]) -> list[Group]:
    out = []
    for method, (acc, ece) in groups.items():
        g = Group(8, backbone, dataset, method, "")
        g.seeds, g.values = [1, 2, 3], {"accuracy": acc, "ece": ece}
        out.append(g)
    return out


def test_claims_are_computed_and_marked_supported_or_not():
    from calibprompt.reporting.claims import all_claims, bootstrap_interval

    groups = (_cell("BiomedCLIP", "COVID", {  # CalibPrompt: -70.6% ECE, same accuracy, best
        "coop-ce": ([0.80, 0.82, 0.81], [0.10, 0.12, 0.11]),
        "calibprompt": ([0.805, 0.81, 0.815], [0.03, 0.035, 0.032]),
        "coop-ce+ts": ([0.80, 0.82, 0.81], [0.05, 0.06, 0.055])})
        + _cell("PLIP", "Kather", {  # CalibPrompt worse in ECE and 3 points less accurate, third of three
            "coop-ce": ([0.90, 0.91, 0.92], [0.05, 0.06, 0.04]),
            "calibprompt": ([0.87, 0.88, 0.89], [0.07, 0.08, 0.065]),
            "coop-ce+ts": ([0.90, 0.91, 0.92], [0.02, 0.03, 0.025])})
        + _cell("PLIP", "PanNuke", {  # mixed signs over seeds: the interval spans 0
            "coop-ce": ([0.7, 0.7, 0.7], [0.10, 0.10, 0.10]),
            "calibprompt": ([0.7, 0.7, 0.7], [0.08, 0.11, 0.095])}))
    result = all_claims(_collection(groups))
    verdicts = {(c["statement"], c["where"]): c["verdict"] for c in result["claims"]}
    lower = "CalibPrompt has lower ECE than CoOp-CE"
    keep = "CalibPrompt does not lose accuracy (at most 1 point below CoOp-CE)"
    assert verdicts[(lower, "BiomedCLIP · COVID · 8 shots")] == "supported"
    assert verdicts[(lower, "PLIP · Kather · 8 shots")] == "not supported"
    assert verdicts[(lower, "PLIP · PanNuke · 8 shots")] == "inconclusive"
    assert verdicts[(keep, "BiomedCLIP · COVID · 8 shots")] == "supported"
    assert verdicts[(keep, "PLIP · Kather · 8 shots")] == "not supported"
    assert verdicts[("CalibPrompt reduces ECE by up to 70% relative to CoOp-CE", "all cells")] == "supported"
    assert verdicts[("CalibPrompt has the best or second-best ECE in most cells", "all cells")] == "supported"  # 2 of 3
    covid = next(r for r in result["cells"] if r["dataset"] == "COVID")
    assert covid["relative_ece_reduction_pct"] == pytest.approx(100 * (0.11 - 0.097 / 3) / 0.11)
    assert covid["ece_rank"] == 1 and covid["accuracy_change_points"] == pytest.approx(0.0, abs=1e-9)
    kather = next(r for r in result["cells"] if r["dataset"] == "Kather")
    assert kather["ece_rank"] == 3 and kather["accuracy_change_points"] == pytest.approx(-3.0)
    low, high = bootstrap_interval(np.array([-0.02, 0.01, -0.005]))
    assert low < 0 < high
    assert bootstrap_interval(np.array([-0.07, -0.085, -0.078]))[1] < 0

    weaker = all_claims(_collection(groups[3:]))  # without the COVID cell: no 70% reduction, 1 of 2 cells
    verdicts = {c["statement"]: c["verdict"] for c in weaker["claims"] if c["where"] == "all cells"}
    assert verdicts == {"CalibPrompt reduces ECE by up to 70% relative to CoOp-CE": "not supported",
                        "CalibPrompt has the best or second-best ECE in most cells": "not supported"}


def test_ablation_claims_for_shots_and_context_length():
    from calibprompt.reporting.claims import ablation_claims

    def row(axis, value, acc, ece, method="calibprompt"):
        return {"backbone": "B", "dataset": "D", "method": method, "axis": axis, "value": value,
                "accuracy_mean": acc, "ece_mean": ece}

    shots = ablation_claims([row("shots", 1, 0.6, 0.2), row("shots", 16, 0.8, 0.1), row("shots", 1, 0.9, 0.0, "coop-ce")])
    assert [(c.statement, c.verdict) for c in shots] == [
        ("More shots improve CalibPrompt's accuracy and calibration", "supported")]
    worse = ablation_claims([row("shots", 1, 0.6, 0.05), row("shots", 16, 0.8, 0.1)])
    assert worse[0].verdict == "not supported"
    ctx = ablation_claims([row("prompt.n_ctx", n, acc, ece) for n, acc, ece in
                           ((4, 0.7, 0.05), (16, 0.8, 0.06), (32, 0.75, 0.09))])
    assert ctx[0].verdict == "inconclusive" and "lowest ECE at n_ctx 4" in ctx[0].evidence
