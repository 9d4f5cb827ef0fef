"""Paired per-seed comparisons: the differences of two methods run on the same shots, a t-interval
over seeds, and a plain-language reading of them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def values(results: dict[int, dict], key: str, seeds: list[int]) -> np.ndarray:
    """One metric of one method per seed (``results[seed]["result"]["metrics"][key]``)."""
    return np.array([float(results[s]["result"]["metrics"][key]) for s in seeds])


def t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    if len(d) < 2:
        return (float("nan"), float("nan"))
    from scipy.stats import t as student

    half = student.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def paired_differences(methods: list[dict], results: dict, reference: str | None, seeds: list[int]) -> list[dict]:
    """Per seed (same split, same shots): method minus reference, for ECE and accuracy (fractions)."""
    if reference is None:
        return []
    out = []
    for entry in methods:
        label = entry["label"]
        if label == reference:
            continue
        rec: dict[str, Any] = {"method": entry["method"]["name"], "label": label, "reference": reference,
                               "seeds": seeds}
        for key in ("ece", "accuracy", "nll", "adaptive_ece"):
            d = values(results[label], key, seeds) - values(results[reference], key, seeds)
            lo, hi = t_interval(d)
            rec[key] = {"per_seed": d.tolist(), "mean": float(d.mean()),
                        "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "ci95": [lo, hi],
                        "n_lower": int((d < 0).sum()), "n_higher": int((d > 0).sum())}
        ece, acc = rec["ece"], rec["accuracy"]
        rec["verdict"] = verdict(ece, acc)
        out.append(rec)
    return out


def verdict(ece: dict, acc: dict) -> str:
    """A plain-language reading of the paired differences (no significance claims beyond the t-interval)."""
    n = len(ece["per_seed"])
    lo, hi = ece["ci95"]
    if hi < 0:
        e = f"lower ECE in {ece['n_lower']}/{n} seeds (95% CI of the mean difference below 0)"
    elif lo > 0:
        e = f"higher ECE in {ece['n_higher']}/{n} seeds (95% CI above 0)"
    else:
        e = f"no clear ECE difference (lower in {ece['n_lower']}/{n} seeds; 95% CI spans 0)"
    cost = -acc["mean"] * 100
    a = ("accuracy within 1 point" if cost <= 1.0 else f"accuracy {cost:.1f} points lower") if cost >= 0 else \
        f"accuracy {-cost:.1f} points higher"
    return f"{e}; {a}"


def set_size_verdicts(rows: list[dict], reference: str) -> list[str]:
    """One sentence per CalibPrompt row (``method`` starting with "calibprompt"): were its conformal sets
    smaller than the ``reference`` row's? Rows: {"label", "method", "size", "coverage"} (means, fractions)."""
    ref = next((r for r in rows if r["label"] == reference), None)
    if ref is None:
        return []
    out = []
    for r in rows:
        if not r["method"].startswith("calibprompt"):
            continue
        smaller = r["size"] < ref["size"]
        out.append(f"{r['label']}: mean set size {r['size']:.3f} vs {ref['size']:.3f} for {reference} "
                   f"({'smaller' if smaller else 'not smaller'}), coverage {100 * r['coverage']:.1f}% vs "
                   f"{100 * ref['coverage']:.1f}%.")
    return out
