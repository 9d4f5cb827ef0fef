"""Ablation sweeps: accuracy and ECE against one axis (shots, or a swept number such as prompt.n_ctx).

A sweep is an ablation when its groups differ along exactly one numeric axis besides backbone, dataset and
method: several ``shots`` values, or one sweep key whose values are numbers (``n_ctx: [4, 8, 16, 32]`` in
a grid is the sweep key ``prompt.n_ctx``). ``calibprompt report`` then writes ``ablation.csv`` (one row
per backbone, dataset, method and axis value: mean, std and 95% t-interval over seeds of accuracy and
ECE) and one figure per (backbone, dataset): accuracy and ECE against the axis, a line per method with
its 95% band.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from calibprompt.reporting.collect import Collection
from calibprompt.reporting.stats import t_interval

AXIS_METRICS = ("accuracy", "ece")


def _variant_parts(variant: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in variant.split(", ") if "=" in part) if variant else {}


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def ablation_axis(collection: Collection) -> str | None:
    """"shots", a swept key (e.g. "prompt.n_ctx"), or None when the sweep is not a one-axis ablation."""
    groups = collection.groups
    if not groups:
        return None
    if len({g.shots for g in groups}) > 1:
        return "shots"
    keys = {k for g in groups for k in _variant_parts(g.variant)}
    numeric = [k for k in sorted(keys) if all(_number(_variant_parts(g.variant).get(k, "")) is not None
                                               for g in groups if k in _variant_parts(g.variant))]
    candidates = [k for k in numeric if len({_variant_parts(g.variant).get(k) for g in groups} - {None}) > 1]
    return candidates[0] if len(candidates) == 1 else None


def ablation_rows(collection: Collection, axis: str) -> list[dict]:
    """One row per (backbone, dataset, method line, axis value) with each metric's mean, std and 95% interval."""
    rows = []
    for g in collection.groups:
        parts = _variant_parts(g.variant)
        if axis == "shots":
            value = float(g.shots)
        elif axis in parts:
            value = float(parts.pop(axis))
        else:
            continue  # a method the axis does not apply to (e.g. no prompts to vary)
        line = g.method + (f" [{', '.join(f'{k}={v}' for k, v in sorted(parts.items()))}]" if parts else "")
        row = {"backbone": g.backbone, "dataset": g.dataset, "method": line, "axis": axis, "value": value}
        for metric in AXIS_METRICS:
            vals = np.array([v for v in g.values.get(metric, []) if v is not None and not math.isnan(v)])
            low, high = t_interval(vals) if len(vals) else (float("nan"), float("nan"))
            row.update({f"{metric}_mean": float(vals.mean()) if len(vals) else float("nan"),
                        f"{metric}_std": float(vals.std(ddof=1)) if len(vals) > 1 else float("nan"),
                        f"{metric}_ci_low": low, f"{metric}_ci_high": high, "n": int(len(vals))})
        rows.append(row)
    return sorted(rows, key=lambda r: (r["backbone"], r["dataset"], r["method"], r["value"]))


def ablation_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def ablation_plot(rows: list[dict], path: Path, title: str) -> bool:
    """Accuracy and ECE (%) against the axis, one line per method with its 95% band (log2 x for shots
    and context lengths, which double)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibprompt.settings import atomic_write_bytes

    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4))
    for ax, metric, label in zip(axes, AXIS_METRICS, ("accuracy (%)", "ECE (%)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            x = np.array([r["value"] for r in mine])
            y = 100 * np.array([r[f"{metric}_mean"] for r in mine])
            low = 100 * np.array([r[f"{metric}_ci_low"] for r in mine])
            high = 100 * np.array([r[f"{metric}_ci_high"] for r in mine])
            ax.plot(x, y, marker="o", label=method)
            if np.isfinite(low).all() and np.isfinite(high).all():
                ax.fill_between(x, low, high, alpha=0.15)
        ax.set_xscale("log", base=2)
        values = sorted({r["value"] for r in rows})
        ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set_xlabel(rows[0]["axis"])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True
