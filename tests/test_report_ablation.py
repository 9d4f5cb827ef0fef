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
