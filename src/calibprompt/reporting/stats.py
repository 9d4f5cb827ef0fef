"""Paired per-seed comparisons: the differences of two methods run on the same shots, the paired
t-interval of their mean (``scipy.stats.ttest_rel``), a Wilcoxon signed-rank p-value beside it
(``scipy.stats.wilcoxon``; exact for small seed counts, so 5 seeds cannot go below p = 0.0625), and a
plain-language reading of them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def values(results: dict[int, dict], key: str, seeds: list[int]) -> np.ndarray:
    """One metric of one method per seed (``results[seed]["result"]["metrics"][key]``)."""
    return np.array([float(results[s]["result"]["metrics"][key]) for s in seeds])


def t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of paired differences ``d`` (NaN for fewer than 2)."""
    return paired_test(np.asarray(d, dtype=np.float64), np.zeros(len(d)), level)["ci"]


def paired_test(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """``a - b`` per seed: its mean, the ``ttest_rel(a, b).confidence_interval(level)`` of the mean, and the
    two-sided Wilcoxon signed-rank p-value (NaN when every difference is 0 or fewer than 2 seeds)."""
    import warnings

    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = a - b
    out: dict[str, Any] = {"mean": float(d.mean()) if len(d) else float("nan"),
                           "ci": (float("nan"), float("nan")), "wilcoxon_p": float("nan")}
    if len(d) < 2:
        return out
    if np.all(d == d[0]):  # no spread: the t-interval is the point itself
        out["ci"] = (float(d[0]), float(d[0]))
    else:
        ci = stats.ttest_rel(a, b).confidence_interval(level)
        out["ci"] = (float(ci.low), float(ci.high))
    if np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample and tie notes of scipy
            out["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
    return out


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
            a, b = values(results[label], key, seeds), values(results[reference], key, seeds)
            d, test = a - b, paired_test(a, b)
            rec[key] = {"per_seed": d.tolist(), "mean": test["mean"],
                        "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "ci95": list(test["ci"]),
                        "wilcoxon_p": test["wilcoxon_p"], "n_lower": int((d < 0).sum()), "n_higher": int((d > 0).sum())}
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
    if not math.isnan(ece.get("wilcoxon_p", float("nan"))):
        e += f", Wilcoxon p = {ece['wilcoxon_p']:.3g}"
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
