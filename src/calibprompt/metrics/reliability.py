"""Reliability diagrams as PNG files, each with its data as JSON beside it (``path.with_suffix(".json")``).

Top-label: bars of accuracy per confidence bin, the gap to the bin's mean confidence shaded, the
diagonal, a strip with the density of confidences below, and the ECE in the legend.
Classwise: one panel per class k, binning p_ik of every sample against 1[y_i = k].
Drawn with matplotlib's Agg canvas directly (no pyplot state), so it is safe in workers.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from ..settings import atomic_write_bytes, atomic_write_json
from .binning import Bins, equal_width_bins, histogram_digitize_bins_reference
from .inputs import Closed, top_label
from .suite import check_options

DENSITY_BINS = 50


def _paths(path_png: Any) -> tuple[Path, Path]:
    path = Path(path_png)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path_png must end in .png, got {str(path)!r}; the JSON data goes beside it")
    return path, path.with_suffix(".json")


def _density(scores: np.ndarray) -> dict[str, list]:
    counts, edges = np.histogram(scores, bins=DENSITY_BINS, range=(0.0, 1.0))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _draw(ax: Any, strip: Any, bins: Bins, scores: np.ndarray, ece: float, xlabel: str, ylabel: str) -> None:
    width = bins.hi - bins.lo
    shown = bins.stat_count > 0
    ax.bar(bins.lo[shown], bins.accuracy[shown], width=width[shown], align="edge",
           color="#4c72b0", edgecolor="black", linewidth=0.6, label=ylabel, zorder=3)
    low = np.minimum(bins.accuracy, bins.mean_conf)[shown]
    ax.bar(bins.lo[shown], bins.gap[shown], bottom=low, width=width[shown], align="edge",
           color="#e24a33", alpha=0.35, hatch="//", edgecolor="#e24a33", linewidth=0.6,
           label=f"gap to mean {xlabel}", zorder=4)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, zorder=5)
    ax.plot([], [], " ", label=f"ECE = {100 * ece:.2f}%")  # legend-only entry
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.3, zorder=0)
    ax.legend(loc="upper left", fontsize="x-small", framealpha=0.9)
    counts, edges = np.histogram(scores, bins=DENSITY_BINS, range=(0.0, 1.0))
    strip.bar(edges[:-1], counts / max(len(scores), 1), width=np.diff(edges), align="edge", color="grey")
    strip.set_xlim(0, 1)
    strip.set_xlabel(xlabel)
    strip.set_ylabel("share", fontsize="small")


def _figure(**kwargs: Any) -> Any:
    # deferred import keeps ``import calibprompt.metrics`` light; the Agg canvas needs no display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, png: Path, js: Path, data: dict[str, Any]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(png, buf.getvalue())
    atomic_write_json(js, data)


def reliability_diagram(
    scores: Any,
    labels: Any,
    path_png: Any,
    n_bins: int = 10,
    title: str | None = None,
    *,
    inputs: str = "logits",
    convention: str = "standard",
    closed: Closed = "left",
) -> dict[str, Any]:
    """Top-label reliability diagram of logits (or probabilities, inputs="probs").

    Writes ``path_png`` and its data (per bin: lo, hi, count, mean_confidence, accuracy, gap; the ECE;
    a 50-bin confidence histogram) to ``path_png.with_suffix(".json")`` and returns that data.
    convention="reference" uses the official ECE bins (conf = 1.0 weighted but not averaged, Q4).
    """
    png, js = _paths(path_png)
    n_bins, convention, closed = check_options(n_bins, convention, closed)
    t = top_label(scores, labels, inputs)
    if convention == "reference":
        bins = histogram_digitize_bins_reference(t.conf, t.correct, n_bins)
    else:
        bins = equal_width_bins(t.conf, t.correct, n_bins, closed)
    data = {
        "kind": "top-label", "convention": convention, "n_bins": n_bins, "closed": closed,
        "n_samples": t.n, "accuracy": float(t.correct.mean()), "ece": bins.expected_gap(),
        "bins": bins.records(), "confidence_histogram": _density(t.conf), "png": png.name,
    }
    fig = _figure(figsize=(5, 6))
    grid = fig.add_gridspec(2, 1, height_ratios=[4, 1], hspace=0.08)
    ax, strip = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    _draw(ax, strip, bins, t.conf, data["ece"], "confidence", "accuracy")
    if title:
        ax.set_title(title)
    _save(fig, png, js, data)
    return data


def classwise_reliability_diagram(
    scores: Any,
    labels: Any,
    path_png: Any,
    n_bins: int = 10,
    title: str | None = None,
    *,
    inputs: str = "logits",
    class_names: Sequence[str] | None = None,
    closed: Closed = "left",
) -> dict[str, Any]:
    """One panel per class k: p_ik of all samples binned against 1[y_i = k] (classwise calibration).

    Writes the PNG and its JSON (per class: name, ECE_k, bins, score histogram; and the classwise
    ECE, their mean) and returns the data.
    """
    png, js = _paths(path_png)
    n_bins, _, closed = check_options(n_bins, "standard", closed)
    t = top_label(scores, labels, inputs)
    names = [str(k) for k in range(t.k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != t.k:
        raise ValueError(f"class_names has {len(names)} names but the scores have K = {t.k} classes")
    cols = min(t.k, 4)
    rows = math.ceil(t.k / cols)
    fig = _figure(figsize=(3.6 * cols, 4.6 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.3, wspace=0.3)
    classes = []
    for k in range(t.k):
        outcome = (t.labels == k).astype(np.float64)
        bins = equal_width_bins(t.probs[:, k], outcome, n_bins, closed)
        ece_k = bins.expected_gap()
        r, c = divmod(k, cols)
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[4, 1], hspace=0.08)
        ax, strip = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
        _draw(ax, strip, bins, t.probs[:, k], ece_k, f"p({names[k]})", "frequency")
        ax.set_title(names[k], fontsize="medium")
        classes.append({"class": k, "name": names[k], "ece": ece_k, "bins": bins.records(),
                        "score_histogram": _density(t.probs[:, k])})
    data = {
        "kind": "classwise", "n_bins": n_bins, "closed": closed, "n_samples": t.n, "n_classes": t.k,
        "classwise_ece": float(np.mean([c["ece"] for c in classes])), "classes": classes, "png": png.name,
    }
    if title:
        fig.suptitle(title)
    _save(fig, png, js, data)
    return data
