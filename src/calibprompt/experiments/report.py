"""``calibprompt report DIR``: paper-style tables from a sweep's results store.

One table per (shots, backbone): rows are methods (with their sweep values), columns are datasets x
metrics; each cell is the mean +- sample std (ddof 1) over the seeds that finished. Per column the best
value is bold and the second best underlined (Markdown: italic), ranked on the value as displayed, so
ties share a mark. Fractions are shown in percent; NLL and Brier as they are.

Written to ``DIR/report/``: ``tables.md``, ``tables.tex`` (booktabs), ``results.csv`` (long format, one
row per group and metric, with full-precision mean/std and the rank), ``report.html`` with a per-dataset
ECE-vs-accuracy plot (``figures/ece_accuracy_<shots>shot.png``) and reliability diagrams pooled over
seeds (``figures/reliability/*.png``, from each run's predictions.csv).
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np

from calibprompt.experiments.store import ResultStore
from calibprompt.settings import atomic_write_bytes, atomic_write_text

DEFAULT_METRICS = ("accuracy", "ece", "mce", "ace")
#: metric -> (column label, higher is better (None: not ranked), shown in percent)
METRIC_INFO: dict[str, tuple[str, bool | None, bool]] = {
    "accuracy": ("ACC", True, True),
    "macro_f1": ("F1", True, True),
    "confidence": ("Conf", None, True),
    "ece": ("ECE", False, True),
    "mce": ("MCE", False, True),
    "ace": ("ACE", False, True),
    "adaptive_ece": ("ACE", False, True),
    "classwise_ece": ("cw-ECE", False, True),
    "smece": ("smECE", False, True),
    "ece_kde": ("ECE-KDE", False, True),
    "nll": ("NLL", False, False),
    "brier": ("Brier", False, False),
}
DECIMALS = {True: 2, False: 3}  # percent -> 2 decimals, raw -> 3


@dataclass
class Group:
    """The runs of one table cell group: (shots, backbone, dataset, method row)."""

    shots: int
    backbone: str
    dataset: str
    method: str
    variant: str
    planned: int = 0
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    run_dirs: list[Path] = field(default_factory=list)
    n_bins: int = 10
    failed: int = 0

    @property
    def row(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def n(self) -> int:
        return len(self.seeds)

    def stat(self, metric: str) -> tuple[float, float | None, int] | None:
        vals = [v for v in self.values.get(metric, []) if v is not None and not math.isnan(v)]
        if not vals:
            return None
        return mean(vals), (stdev(vals) if len(vals) > 1 else None), len(vals)


@dataclass
class Collection:
    sweep: dict
    groups: list[Group]
    failed: list[dict]
    counts: dict[str, int]
    convention: str


# ------------------------------------------------------------------------------------------- collect
def collect(out_dir: str | Path, store_url: str | None = None, convention: str = "standard") -> Collection:
    """Group the done runs of the sweep in ``out_dir`` (only those the current grid plans)."""
    from calibprompt.experiments.sweep import read_sweep_file

    out_dir = Path(out_dir)
    sweep = read_sweep_file(out_dir)
    if sweep is None:
        raise FileNotFoundError(f"{out_dir} holds no sweep.json; run `calibprompt sweep GRID --out {out_dir}` first")
    if convention not in ("standard", "reference"):
        raise ValueError(f"convention must be 'standard' or 'reference', got {convention!r}")
    url = store_url or _stored_url(sweep, out_dir)
    store = ResultStore.for_dir(out_dir, url)
    try:
        planned = sweep["runs"]
        rows = {r["config_hash"]: r for r in store.rows(sweep["sweep_id"], [p["config_hash"] for p in planned])}
    finally:
        store.close()
    key_of = "metrics" if convention == "standard" else "metrics_reference"
    groups: dict[tuple, Group] = {}
    failed = []
    counts = {"planned": len(planned), "done": 0, "failed": 0, "pending": 0, "running": 0}
    for plan in planned:
        vkey = _variant_key(plan.get("variant") or {})
        key = (plan["shots"], plan["backbone"], plan["dataset"], plan["method"], vkey)
        group = groups.setdefault(key, Group(*key))
        group.planned += 1
        row = rows.get(plan["config_hash"])
        status = row["status"] if row else "pending"
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            group.failed += 1
            failed.append({"run_id": plan["run_id"], "title": f"{group.row} · {plan['backbone']} · {plan['dataset']} · "
                           f"{plan['shots']} shots · seed {plan['seed']}", "error": (row.get("error") or "").strip()})
        if status != "done":
            continue
        metrics = row.get(key_of) or {}
        group.seeds.append(plan["seed"])
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                group.values.setdefault(name, []).append(float(value))
        local = out_dir / "runs" / plan["run_id"]
        group.run_dirs.append(local if local.is_dir() else Path(row.get("run_dir") or local))
        group.n_bins = int(((row.get("config") or {}).get("eval") or {}).get("n_bins", 10))
    return Collection(sweep, list(groups.values()), failed, counts, convention)


def _stored_url(sweep: dict, out_dir: Path) -> str | None:
    from calibprompt.experiments.store import STORE_ENV, default_url

    url = sweep.get("store")
    if sweep.get("store_default") or not url:
        return default_url(out_dir)  # DIR/results.sqlite, wherever DIR is now
    if "***" in url:
        if os.environ.get(STORE_ENV):
            return os.environ[STORE_ENV]
        raise ValueError(f"the sweep in {out_dir} used the store {url}; give its password with --store URL "
                         f"(or ${STORE_ENV})")
    return url


def _variant_key(variant: dict) -> str:
    from calibprompt.experiments.grid import variant_key

    return variant_key(variant)


# ------------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    shots: int
    backbone: str
    datasets: list[str]
    metrics: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Group]  # (row, dataset) -> group
    ranks: dict[tuple[str, str, str], int]  # (row, dataset, metric) -> 1 best, 2 second
    seeds: list[int]


def build_tables(collection: Collection, metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[Table]:
    for m in metrics:
        if m not in METRIC_INFO:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRIC_INFO)}")
    tables = []
    order: dict[tuple, None] = {}
    for g in collection.groups:
        order.setdefault((g.shots, g.backbone), None)
    for shots, backbone in order:
        groups = [g for g in collection.groups if g.shots == shots and g.backbone == backbone]
        datasets = list(dict.fromkeys(g.dataset for g in groups))
        rows = list(dict.fromkeys(g.row for g in groups))
        cells = {(g.row, g.dataset): g for g in groups}
        ranks: dict[tuple[str, str, str], int] = {}
        for d in datasets:
            for m in metrics:
                higher = METRIC_INFO[m][1]
                if higher is None:
                    continue
                shown = {}
                for r in rows:
                    g = cells.get((r, d))
                    st = g.stat(m) if g else None
                    if st is not None:
                        shown[r] = round(_scaled(st[0], m), DECIMALS[METRIC_INFO[m][2]])
                if len(shown) < 2:
                    continue
                distinct = sorted(set(shown.values()), reverse=higher)
                for r, v in shown.items():
                    if v == distinct[0]:
                        ranks[(r, d, m)] = 1
                    elif len(distinct) > 1 and v == distinct[1]:
                        ranks[(r, d, m)] = 2
        seeds = sorted({s for g in groups for s in g.seeds})
        tables.append(Table(shots, backbone, datasets, list(metrics), rows, cells, ranks, seeds))
    return tables


def _scaled(value: float, metric: str) -> float:
    return value * 100 if METRIC_INFO[metric][2] else value


def cell_text(group: Group | None, metric: str, std: bool = True) -> str:
    """The displayed value: ``12.34 ± 1.23`` (percent) / ``0.512 ± 0.010``; ``–`` when no run finished;
    a trailing ``†`` when fewer seeds finished than were planned."""
    st = group.stat(metric) if group else None
    if st is None:
        return "–"
    m, s, n = st
    dec = DECIMALS[METRIC_INFO[metric][2]]
    text = f"{_scaled(m, metric):.{dec}f}"
    if std and s is not None:
        text += f" ± {_scaled(s, metric):.{dec}f}"
    if n < group.planned:
        text += " †"
    return text


def _header(metric: str) -> str:
    label, higher, _ = METRIC_INFO[metric]
    return f"{label} {'↑' if higher else '↓' if higher is not None else ''}".strip()


def _caption(t: Table, collection: Collection) -> str:
    sweep = collection.sweep
    seeds = ", ".join(map(str, t.seeds)) or "none"
    parts = [f"{t.backbone} · {t.shots} shots", f"mean ± std over seeds {{{seeds}}}"]
    if collection.convention == "reference":
        parts.append("official (reference) metric convention")
    hparams = (sweep.get("effective") or {}).get("hparams")
    if hparams == "paper":
        parts.append("CalibPrompt α, λ_AS from the paper's table (chosen on the test split, Q13)")
    elif hparams:
        parts.append(f"α, λ_AS tuned on validation shots ({Path(hparams).name})")
    return " · ".join(parts)


def markdown(tables: list[Table], collection: Collection) -> str:
    out = [f"# {collection.sweep.get('name', 'sweep')}: results", "",
           f"{collection.counts['done']}/{collection.counts['planned']} runs done"
           + (f", {collection.counts['failed']} failed" if collection.counts.get("failed") else "")
           + ". Percent except NLL and Brier. **bold** = best, _italic_ = second best per column; "
             "† = fewer seeds finished than planned.", ""]
    for t in tables:
        out.append(f"## {_caption(t, collection)}")
        out.append("")
        head = ["Method"] + [f"{d} {_header(m)}" for d in t.datasets for m in t.metrics]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" + "---:|" * (len(head) - 1))
        for r in t.rows:
            cells = [_md_escape(r)]
            for d in t.datasets:
                for m in t.metrics:
                    text = cell_text(t.cells.get((r, d)), m)
                    rank = t.ranks.get((r, d, m))
                    cells.append(f"**{text}**" if rank == 1 else f"_{text}_" if rank == 2 else text)
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


_TEX = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(c, c) for c in text).replace("·", r"$\cdot$").replace("±", r"$\pm$") \
        .replace("α", r"$\alpha$").replace("λ", r"$\lambda$").replace("†", r"$^\dagger$").replace("–", "--")


def latex(tables: list[Table], collection: Collection) -> str:
    out = [f"% calibprompt report of sweep {collection.sweep.get('name', '')}: needs \\usepackage{{booktabs}}", ""]
    for t in tables:
        k = len(t.metrics)
        out += [r"\begin{table}[t]", r"\centering", r"\footnotesize",
                rf"\caption{{{_tex(_caption(t, collection))}. Best in bold, second best underlined.}}",
                r"\begin{tabular}{l" + ("".join(" " + "r" * k for _ in t.datasets)) + "}", r"\toprule"]
        out.append(" & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{_tex(d)}}}" for d in t.datasets) + r" \\")
        out.append(" ".join(rf"\cmidrule(lr){{{2 + i * k}-{1 + (i + 1) * k}}}" for i in range(len(t.datasets))))
        heads = [_tex(METRIC_INFO[m][0]) + (r" $\uparrow$" if METRIC_INFO[m][1] else
                                             r" $\downarrow$" if METRIC_INFO[m][1] is False else "")
                 for _ in t.datasets for m in t.metrics]
        out.append("Method & " + " & ".join(heads) + r" \\")
        out.append(r"\midrule")
        for r in t.rows:
            cells = [_tex(r)]
            for d in t.datasets:
                for m in t.metrics:
                    g = t.cells.get((r, d))
                    st = g.stat(m) if g else None
                    if st is None:
                        cells.append("--")
                        continue
                    dec = DECIMALS[METRIC_INFO[m][2]]
                    value = f"{_scaled(st[0], m):.{dec}f}"
                    rank = t.ranks.get((r, d, m))
                    value = rf"\textbf{{{value}}}" if rank == 1 else rf"\underline{{{value}}}" if rank == 2 else value
                    if st[1] is not None:
                        value += rf"{{\scriptsize$\pm${_scaled(st[1], m):.{dec}f}}}"
                    if st[2] < g.planned:
                        value += r"$^\dagger$"
                    cells.append(value)
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


CSV_COLUMNS = ("shots", "backbone", "dataset", "method", "variant", "metric", "mean", "std", "n", "planned",
               "seeds", "rank", "display", "unit")


def csv_text(tables: list[Table], collection: Collection) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for t in tables:
        for r in t.rows:
            for d in t.datasets:
                g = t.cells.get((r, d))
                if g is None:
                    continue
                for m in t.metrics:
                    st = g.stat(m)
                    writer.writerow([g.shots, g.backbone, g.dataset, g.method, g.variant, m,
                                     "" if st is None else repr(st[0]),
                                     "" if st is None or st[1] is None else repr(st[1]),
                                     0 if st is None else st[2], g.planned, " ".join(map(str, g.seeds)),
                                     t.ranks.get((r, d, m), ""), cell_text(g, m),
                                     "%" if METRIC_INFO[m][2] else ""])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- figures
def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def ece_accuracy_plot(collection: Collection, shots: int, path: Path) -> bool:
    """Per (backbone, dataset) panel: mean accuracy (x) against mean ECE (y) of every method, with
    std error bars over seeds. Lower right is better."""
    panels = list(dict.fromkeys((g.backbone, g.dataset) for g in collection.groups if g.shots == shots))
    panels = [p for p in panels if any(g.stat("ece") for g in collection.groups
                                       if (g.shots, g.backbone, g.dataset) == (shots, *p))]
    if not panels:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(figsize=(5.2 * cols, 4.2 * rows))
    for i, (b, d) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        groups = [g for g in collection.groups if (g.shots, g.backbone, g.dataset) == (shots, b, d)]
        for j, g in enumerate(groups):
            acc, ece = g.stat("accuracy"), g.stat("ece")
            if acc is None or ece is None:
                continue
            ax.errorbar(acc[0] * 100, ece[0] * 100, xerr=(acc[1] or 0) * 100, yerr=(ece[1] or 0) * 100,
                        fmt="o", color=f"C{j % 10}", capsize=3, label=g.row)
            ax.annotate(g.row, (acc[0] * 100, ece[0] * 100), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{b} · {d} · {shots} shots", fontsize=10)
        ax.set_xlabel("accuracy (%)")
        ax.set_ylabel("ECE (%)")
        ax.grid(alpha=0.3)
    atomic_write_bytes(path, _png(fig))
    return True


def pooled_reliability(group: Group, path: Path) -> bool:
    """Reliability diagram of the group's test predictions pooled over its seeds (predictions.csv)."""
    from calibprompt.metrics import reliability_diagram

    probs, labels = [], []
    for run_dir in group.run_dirs:
        p, y = _read_predictions(run_dir / "predictions.csv")
        if p is not None:
            probs.append(p)
            labels.append(y)
    if not probs or len({p.shape[1] for p in probs}) != 1:
        return False
    title = f"{group.row} · {group.backbone} · {group.dataset}\n{group.shots} shots · {len(probs)} seed(s) pooled"
    reliability_diagram(np.concatenate(probs), np.concatenate(labels), path, n_bins=group.n_bins, title=title,
                        inputs="probs")
    return True


def _read_predictions(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not path.is_file():
        return None, None
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or "label" not in header:
            return None, None
        li = header.index("label")
        pi = [i for i, h in enumerate(header) if h.startswith("prob_")]
        rows = [(int(r[li]), [float(r[i]) for i in pi]) for r in reader if r]
    if not rows:
        return None, None
    probs = np.array([r[1] for r in rows], dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # undo the 8-digit rounding of the CSV
    return probs, np.array([r[0] for r in rows])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")[:80] or "x"


# ------------------------------------------------------------------------------------------- html
def html_report(tables: list[Table], collection: Collection, figures: dict[str, Any]) -> str:
    e = html.escape
    sweep = collection.sweep
    c = collection.counts
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(sweep.get('name', 'sweep'))} · calibprompt report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
        "thead th{background:#f3f3f3}.fig{display:inline-block;margin:4px;vertical-align:top}"
        ".fig img{width:260px}pre{white-space:pre-wrap;font-size:12px;background:#f8f8f8;padding:6px}</style>",
        "</head><body>",
        f"<h1>{e(sweep.get('name', 'sweep'))}</h1>",
        f"<p>{c['done']}/{c['planned']} runs done, {c.get('failed', 0)} failed, "
        f"{c.get('pending', 0) + c.get('running', 0)} not finished. Store: <code>{e(str(sweep.get('store')))}</code>. "
        f"Grid: <code>{e(str(sweep.get('grid_source')))}</code>. Metric convention: {e(collection.convention)}.</p>",
        "<p>Cells: mean ± std over seeds; percent except NLL and Brier. <b>bold</b> = best, <u>underlined</u> = "
        "second best per column; † = fewer seeds finished than planned.</p>",
    ]
    for t in tables:
        parts.append(f"<h2>{e(_caption(t, collection))}</h2><table><thead><tr><th rowspan='2'>Method</th>")
        parts += [f"<th colspan='{len(t.metrics)}'>{e(d)}</th>" for d in t.datasets]
        parts.append("</tr><tr>" + "".join(f"<th>{e(_header(m))}</th>" for _ in t.datasets for m in t.metrics))
        parts.append("</tr></thead><tbody>")
        for r in t.rows:
            cells = [f"<td>{e(r)}</td>"]
            for d in t.datasets:
                for m in t.metrics:
                    text = e(cell_text(t.cells.get((r, d)), m))
                    rank = t.ranks.get((r, d, m))
                    cells.append(f"<td>{'<b>' + text + '</b>' if rank == 1 else '<u>' + text + '</u>' if rank == 2 else text}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    for shots, rel in figures.get("ece_accuracy", []):
        parts.append(f"<h2>ECE against accuracy per dataset · {shots} shots</h2>"
                     f"<p>Mean over seeds with std error bars; lower right is better.</p><img src='{e(rel)}' "
                     "style='max-width:100%'>")
    if figures.get("reliability"):
        parts.append("<h2>Reliability diagrams (test predictions pooled over seeds)</h2>")
        current = None
        for (shots, b, d), rel, label in figures["reliability"]:
            if (shots, b, d) != current:
                current = (shots, b, d)
                parts.append(f"<h3>{e(b)} · {e(d)} · {shots} shots</h3>")
            parts.append(f"<div class='fig'><img src='{e(rel)}' alt='{e(label)}'><br><small>{e(label)}</small></div>")
    if collection.failed:
        parts.append("<h2>Failed runs</h2><table><thead><tr><th>run</th><th>what</th><th>error</th></tr></thead><tbody>")
        for f in collection.failed:
            first = f["error"].splitlines()[0] if f["error"] else ""
            parts.append(f"<tr><td><code>{e(f['run_id'])}</code></td><td>{e(f['title'])}</td>"
                         f"<td style='text-align:left'><details><summary>{e(first)}</summary><pre>{e(f['error'])}</pre>"
                         "</details></td></tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------- entry
FORMATS = ("md", "tex", "csv")


def render(collection: Collection, fmt: str, metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    tables = build_tables(collection, metrics)
    if fmt == "md":
        return markdown(tables, collection)
    if fmt == "tex":
        return latex(tables, collection)
    if fmt == "csv":
        return csv_text(tables, collection)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_report(out_dir: str | Path, *, store_url: str | None = None, metrics: tuple[str, ...] = DEFAULT_METRICS,
                 convention: str = "standard", report_dir: str | Path | None = None,
                 diagrams: bool = True) -> dict[str, str]:
    """Write tables (md, tex, csv) and report.html (with figures) to ``DIR/report``; returns the paths."""
    out_dir = Path(out_dir)
    collection = collect(out_dir, store_url, convention)
    tables = build_tables(collection, metrics)
    target = Path(report_dir) if report_dir else out_dir / "report"
    target.mkdir(parents=True, exist_ok=True)
    paths = {"md": target / "tables.md", "tex": target / "tables.tex", "csv": target / "results.csv",
             "html": target / "report.html"}
    atomic_write_text(paths["md"], markdown(tables, collection) + "\n")
    atomic_write_text(paths["tex"], latex(tables, collection))
    atomic_write_text(paths["csv"], csv_text(tables, collection))
    figures: dict[str, list] = {"ece_accuracy": [], "reliability": []}
    for shots in dict.fromkeys(g.shots for g in collection.groups):
        rel = f"figures/ece_accuracy_{shots}shot.png"
        if ece_accuracy_plot(collection, shots, target / rel):
            figures["ece_accuracy"].append((shots, rel))
    if diagrams:
        for i, g in enumerate(collection.groups):
            rel = f"figures/reliability/{i:03d}_{_slug(f'{g.shots}shot_{g.backbone}_{g.dataset}_{g.row}')}.png"
            if g.run_dirs and pooled_reliability(g, target / rel):
                figures["reliability"].append(((g.shots, g.backbone, g.dataset), rel, g.row))
    atomic_write_text(paths["html"], html_report(tables, collection, figures))
    return {k: str(v) for k, v in paths.items()}
