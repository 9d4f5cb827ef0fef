"""The paper's claims, checked against a sweep's own results (the "Claims" section of every report whose
sweep has CoOp-CE and CalibPrompt rows). Nothing here is written by hand: every statement is computed.

Per cell (shots, backbone, dataset) with both rows:
- ECE: relative reduction 100 * (ECE_CE - ECE_CalibPrompt) / ECE_CE (means over seeds); the paired
  per-seed difference ECE_CalibPrompt - ECE_CE on the seeds both finished, with a 95% percentile
  bootstrap interval of its mean (10,000 resamples of the seeds, fixed generator).
  "CalibPrompt has lower ECE than CoOp-CE": supported when the interval lies below 0, not supported
  when the mean difference is >= 0, inconclusive otherwise (with one seed there is no interval: the
  sign alone, marked as such).
- Accuracy: the change in points; "without losing accuracy": supported when it is >= -1 point.
- Rank: CalibPrompt's place by mean ECE among every method row of the cell.

Across cells: "reduces ECE by up to 70%" (supported when the largest reduction reaches 70%), and
"best or second-best ECE in most cells" (supported when that holds in more than half of the cells).
For ablation sweeps (reporting.ablation): "more shots improve accuracy and calibration" (CalibPrompt's
accuracy higher and ECE lower at the largest shots than at the smallest) and "about 16 context tokens
is best" (CalibPrompt's best accuracy and lowest ECE both at n_ctx 16).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from calibprompt.reporting.collect import Collection, Group

REFERENCE, METHOD = "coop-ce", "calibprompt"
HEADLINE_REDUCTION = 70.0  # "reduces ECE by up to 70%"
ACCURACY_TOLERANCE = 0.01  # "without losing accuracy": at most 1 point lower
BOOTSTRAP = 10_000


@dataclass
class Claim:
    statement: str
    verdict: str  # "supported", "not supported", "inconclusive"
    evidence: str
    where: str = "all cells"


def bootstrap_interval(d: np.ndarray, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``d`` (``scipy.stats.bootstrap``; NaN for fewer than
    2 values)."""
    if len(d) < 2:
        return float("nan"), float("nan")
    from calibprompt.metrics.bootstrap import scipy_bootstrap

    res = scipy_bootstrap((np.asarray(d, dtype=np.float64),), np.mean, n_resamples=BOOTSTRAP, confidence_level=level,
                          method="percentile", seed=seed, vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _per_seed(g: Group, metric: str) -> dict[int, float]:
    return {s: v for s, v in zip(g.seeds, g.values.get(metric, [])) if v is not None and not math.isnan(v)}


def _mean(g: Group, metric: str) -> float:
    stat = g.stat(metric)  # (mean, std, n) over the seeds with a value
    return float(stat[0]) if stat else float("nan")


def cell_claims(collection: Collection) -> tuple[list[Claim], list[dict]]:
    """(claims, one record per cell) for the cells that have plain CoOp-CE and CalibPrompt rows."""
    cells: dict[tuple, dict[str, Group]] = {}
    for g in collection.groups:
        if g.seeds:
            cells.setdefault((g.shots, g.backbone, g.dataset, g.variant), {})[g.method] = g
    claims, records = [], []
    for (shots, backbone, dataset, variant), rows in cells.items():
        if REFERENCE not in rows or METHOD not in rows:
            continue
        ce, cp = rows[REFERENCE], rows[METHOD]
        where = f"{backbone} · {dataset} · {shots} shots" + (f" · {variant}" if variant else "")
        e_ce, e_cp = _mean(ce, "ece"), _mean(cp, "ece")
        seeds = sorted(set(_per_seed(ce, "ece")) & set(_per_seed(cp, "ece")))
        diff = np.array([_per_seed(cp, "ece")[s] - _per_seed(ce, "ece")[s] for s in seeds])
        low, high = bootstrap_interval(diff)
        reduction = 100 * (e_ce - e_cp) / e_ce if e_ce > 0 else float("nan")
        acc_change = _mean(cp, "accuracy") - _mean(ce, "accuracy")
        ranked = sorted(rows.values(), key=lambda g: _mean(g, "ece"))
        rank = 1 + [g.method for g in ranked].index(METHOD)
        records.append({"where": where, "shots": shots, "backbone": backbone, "dataset": dataset, "variant": variant,
                        "ece_coop_ce": e_ce, "ece_calibprompt": e_cp, "relative_ece_reduction_pct": reduction,
                        "accuracy_change_points": 100 * acc_change, "paired_ece_difference_mean": float(diff.mean())
                        if len(diff) else float("nan"), "bootstrap_ci95": [low, high], "n_seeds": len(seeds),
                        "ece_rank": rank, "methods": len(rows)})
        if not len(diff):
            continue
        if diff.mean() >= 0:
            verdict = "not supported"
        elif len(diff) < 2:
            verdict = "supported"
        else:
            verdict = "supported" if high < 0 else "inconclusive"
        ci = f"95% bootstrap CI [{100 * low:+.2f}, {100 * high:+.2f}]" if len(diff) > 1 else "one seed, no interval"
        claims.append(Claim("CalibPrompt has lower ECE than CoOp-CE", verdict,
                            f"ECE {100 * e_ce:.2f}% -> {100 * e_cp:.2f}% ({reduction:+.1f}% relative reduction); "
                            f"paired difference {100 * diff.mean():+.2f} points over {len(diff)} seed(s), {ci}", where))
        claims.append(Claim("CalibPrompt does not lose accuracy (at most 1 point below CoOp-CE)",
                            "supported" if acc_change >= -ACCURACY_TOLERANCE else "not supported",
                            f"accuracy change {100 * acc_change:+.2f} points", where))
    return claims, records


def overall_claims(records: list[dict]) -> list[Claim]:
    if not records:
        return []
    reductions = [r["relative_ece_reduction_pct"] for r in records if not math.isnan(r["relative_ece_reduction_pct"])]
    best = max(reductions) if reductions else float("nan")
    top2 = sum(1 for r in records if r["ece_rank"] <= 2)
    at = next((r["where"] for r in records if r["relative_ece_reduction_pct"] == best), "")
    return [
        Claim(f"CalibPrompt reduces ECE by up to {HEADLINE_REDUCTION:.0f}% relative to CoOp-CE",
              "supported" if best >= HEADLINE_REDUCTION else "not supported",
              f"largest relative reduction {best:.1f}% ({at}) over {len(records)} cell(s)"),
        Claim("CalibPrompt has the best or second-best ECE in most cells",
              "supported" if top2 > len(records) / 2 else "not supported",
              f"best or second-best in {top2} of {len(records)} cell(s) "
              f"(best in {sum(1 for r in records if r['ece_rank'] == 1)})"),
    ]


def ablation_claims(rows: list[dict]) -> list[Claim]:
    """Claims over reporting.ablation rows (CalibPrompt's line per backbone and dataset)."""
    out = []
    mine = [r for r in rows if r["method"] == METHOD]
    for b, d in dict.fromkeys((r["backbone"], r["dataset"]) for r in mine):
        line = sorted((r for r in mine if (r["backbone"], r["dataset"]) == (b, d)), key=lambda r: r["value"])
        if len(line) < 2:
            continue
        axis, where = line[0]["axis"], f"{b} · {d}"
        if axis == "shots":
            lo, hi = line[0], line[-1]
            better = hi["accuracy_mean"] > lo["accuracy_mean"] and hi["ece_mean"] < lo["ece_mean"]
            out.append(Claim("More shots improve CalibPrompt's accuracy and calibration",
                             "supported" if better else "not supported",
                             f"{lo['value']:g} -> {hi['value']:g} shots: accuracy {100 * lo['accuracy_mean']:.1f}% -> "
                             f"{100 * hi['accuracy_mean']:.1f}%, ECE {100 * lo['ece_mean']:.2f}% -> "
                             f"{100 * hi['ece_mean']:.2f}%", where))
        elif axis.endswith("n_ctx"):
            acc_best = max(line, key=lambda r: r["accuracy_mean"])["value"]
            ece_best = min(line, key=lambda r: r["ece_mean"])["value"]
            hits = (acc_best == 16) + (ece_best == 16)
            out.append(Claim("About 16 context tokens give CalibPrompt its best accuracy and calibration",
                             {2: "supported", 1: "inconclusive", 0: "not supported"}[hits],
                             f"best accuracy at n_ctx {acc_best:g}, lowest ECE at n_ctx {ece_best:g}", where))
    return out


def all_claims(collection: Collection, ablation_rows: list[dict] | None = None) -> dict:
    """{"claims": [...], "cells": [...]} for claims.json and the report (empty when there is nothing to check)."""
    per_cell, records = cell_claims(collection)
    claims = overall_claims(records) + per_cell + ablation_claims(ablation_rows or [])
    return {"claims": [asdict(c) for c in claims], "cells": records}
