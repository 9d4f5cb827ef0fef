"""``calibprompt report DIR``: paper-style tables from a sweep's results store.

One table per (shots, backbone): rows are methods (with their sweep values), columns are datasets x
metrics; each cell is the mean +- sample std (ddof 1) over the seeds that finished. Per column the best
value is bold and the second best underlined (Markdown: italic), ranked on the value as displayed, so
ties share a mark. Fractions are shown in percent; NLL and Brier as they are.

Written to ``DIR/report/``: ``tables.md``, ``tables.tex`` (booktabs), ``results.csv`` (long format, one
row per group and metric, with full-precision mean/std and the rank), ``report.html`` with a per-dataset
ECE-vs-accuracy plot (``figures/ece_accuracy_<shots>shot.png``) and reliability diagrams pooled over
seeds (``figures/reliability/*.png``, from each run's predictions.csv), and one risk-coverage plot per
(shots, backbone, dataset) with every method's curve and AURC (``figures/risk_coverage/*.png``).
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.reporting.ablation import ablation_axis, ablation_csv, ablation_plot, ablation_rows
from calibprompt.reporting.claims import all_claims
from calibprompt.reporting.collect import Collection, Group, read_predictions, collect
from calibprompt.reporting.tables import (
    DEFAULT_METRICS,
    Table,
    interval_csv,
    interval_rows,
    _caption,
    _header,
    build_tables,
    cell_text,
    csv_text,
    latex,
    markdown,
)
from calibprompt.settings import atomic_write_bytes, atomic_write_json, atomic_write_text, slug


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
            # numbered points with the names in the legend: a method and its "+ts" twin sit on top of
            # each other, and long names written beside the points would overprint
            ax.errorbar(acc[0] * 100, ece[0] * 100, xerr=(acc[1] or 0) * 100, yerr=(ece[1] or 0) * 100,
                        fmt="o", color=f"C{j % 10}", capsize=3, label=f"{j + 1}  {g.row}")
            ax.annotate(str(j + 1), (acc[0] * 100, ece[0] * 100), fontsize=8, xytext=(4, 4 + 7 * (j % 3)),
                        textcoords="offset points", color=f"C{j % 10}")
        ax.set_title(f"{b} · {d} · {shots} shots", fontsize=10)
        ax.set_xlabel("accuracy (%)")
        ax.set_ylabel("ECE (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.subplots_adjust(wspace=0.9)
    atomic_write_bytes(path, _png(fig))
    return True


def _pooled(group: Group) -> tuple[np.ndarray, np.ndarray] | None:
    """The group's test probabilities and labels pooled over its seeds (None when unreadable)."""
    probs, labels = [], []
    for run_dir in group.run_dirs:
        p, y = read_predictions(run_dir / "predictions.csv")
        if p is not None:
            probs.append(p)
            labels.append(y)
    if not probs or len({p.shape[1] for p in probs}) != 1:
        return None
    return np.concatenate(probs), np.concatenate(labels)


def conformal_verdicts(collection: Collection) -> list[str]:
    """Per (shots, backbone, dataset) with a coop-ce row and conformal metrics: were CalibPrompt's sets smaller?"""
    from calibprompt.reporting.stats import set_size_verdicts

    cells: dict[tuple, list[dict]] = {}
    for g in collection.groups:
        size, cov = g.stat("cp_set_size"), g.stat("cp_coverage")
        if size and cov:
            cells.setdefault((g.shots, g.backbone, g.dataset), []).append(
                {"label": g.row, "method": g.method, "size": size[0], "coverage": cov[0]})
    out = []
    for (shots, b, d), rows in cells.items():
        ref = next((r["label"] for r in rows if r["method"] == "coop-ce"), None)
        out += [f"{b} · {d} · {shots} shots · {v}" for v in (set_size_verdicts(rows, ref) if ref else [])]
    return out


def risk_coverage_plot(groups: list[Group], path: Path, title: str) -> bool:
    """Risk (error rate of the accepted images) against coverage when abstaining below a confidence
    threshold, one curve per method (test predictions pooled over seeds), AURC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibprompt.metrics.selective import risk_coverage_curve, selective_metrics

    curves = [(g.row, _pooled(g)) for g in groups]
    curves = [(row, pooled) for row, pooled in curves if pooled is not None]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for row, (probs, labels) in curves:
        curve = risk_coverage_curve(probs, labels, inputs="probs")
        aurc = selective_metrics(probs, labels, inputs="probs")["aurc"]
        ax.step(curve.coverage, 100 * curve.risk, where="post", label=f"{row} (AURC {100 * aurc:.1f}%)")
    ax.set_xlabel("coverage (share of images not abstained)")
    ax.set_ylabel("risk: error rate of the accepted (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    atomic_write_bytes(path, _png(fig))
    plt.close(fig)
    return True


def pooled_reliability(group: Group, path: Path) -> bool:
    """Reliability diagram of the group's test predictions pooled over its seeds (predictions.csv)."""
    from calibprompt.metrics import reliability_diagram

    pooled = _pooled(group)
    if pooled is None:
        return False
    title = f"{group.row} · {group.backbone} · {group.dataset}\n{group.shots} shots · {len(group.run_dirs)} seed(s) pooled"
    reliability_diagram(pooled[0], pooled[1], path, n_bins=group.n_bins, title=title, inputs="probs")
    return True


def html_report(tables: list[Table], collection: Collection, figures: dict[str, Any],
                embed: Path | None = None) -> str:
    """The HTML report. With ``embed`` (the report folder), every figure is inlined as a base64 PNG so the
    one file can be sent on its own."""
    e = html.escape

    def src(rel: str) -> str:
        if embed is None:
            return e(rel)
        import base64

        return "data:image/png;base64," + base64.b64encode((embed / rel).read_bytes()).decode("ascii")

    sweep = collection.sweep
    c = collection.counts
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(sweep.get('name', 'sweep'))} · calibprompt report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}"
        "thead th{background:#f3f3f3}.fig{display:inline-block;margin:4px;vertical-align:top}"
        ".fig img{width:380px}pre{white-space:pre-wrap;font-size:12px;background:#f8f8f8;padding:6px}</style>",
        "</head><body>",
        f"<h1>{e(sweep.get('name', 'sweep'))}</h1>",
        f"<p>{c['done']}/{c['planned']} runs done, {c.get('failed', 0)} failed, "
        f"{c.get('pending', 0) + c.get('running', 0)} not finished. Store: <code>{e(str(sweep.get('store')))}</code>. "
        f"Grid: <code>{e(str(sweep.get('grid_source')))}</code>. Metric convention: {e(collection.convention)}.</p>",
        "<p>Cells: mean ± std over seeds; percent except NLL and Brier. <b>bold</b> = best, <u>underlined</u> = "
        "second best per column; † = fewer seeds finished than planned; ‡ = a run of the cell is flagged "
        "(listed below; never ranked).</p>",
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
                     f"<p>Mean over seeds with std error bars; lower right is better.</p><img src='{src(rel)}' "
                     "style='max-width:100%'>")
    claims = figures.get("claims") or []
    if claims:
        colour = {"supported": "#1a7f37", "not supported": "#b42318", "inconclusive": "#9a6700"}
        parts.append("<h2>The paper's claims, checked on these results</h2><p>Computed from this sweep's runs "
                     "(<code>claims.json</code>); the rules are in the calibprompt documentation "
                     "(docs/experiments.md, Reports).</p><table><thead><tr><th>claim</th><th>where</th>"
                     "<th>verdict</th><th>evidence</th></tr></thead><tbody>")
        for c in claims:
            parts.append(f"<tr><td style='text-align:left'>{e(c['statement'])}</td><td style='text-align:left'>"
                         f"{e(c['where'])}</td><td style='color:{colour.get(c['verdict'], '#000')}'><b>"
                         f"{e(c['verdict'])}</b></td><td style='text-align:left'>{e(c['evidence'])}</td></tr>")
        parts.append("</tbody></table>")
    if figures.get("ablation"):
        axis = figures["ablation"][0][0]
        parts.append(f"<h2>Ablation: accuracy and ECE against {e(axis)}</h2><p>Mean over seeds with the 95% "
                     "t-interval as a band, one line per method; the numbers are in <code>ablation.csv</code>.</p>")
        for _, rel, title in figures["ablation"]:
            parts.append(f"<div class='fig'><img src='{src(rel)}' alt='{e(title)}' style='width:760px'></div>")
    verdicts = conformal_verdicts(collection)
    if verdicts:
        parts.append("<h2>Conformal prediction sets: CalibPrompt against CoOp-CE</h2><ul>"
                     + "".join(f"<li>{e(v)}</li>" for v in verdicts) + "</ul><p>Add <code>cp_coverage,cp_set_size"
                     "</code> to <code>--metrics</code> for the full table (docs/deploy.md).</p>")
    if figures.get("risk_coverage"):
        parts.append("<h2>Selective prediction: risk against coverage</h2><p>Abstaining below a confidence "
                     "threshold: the error rate of the images kept (lower is better) against the share kept. "
                     "Better-ranked confidences give lower curves and a smaller AURC (test predictions pooled "
                     "over seeds).</p>")
        for (shots, b, d), rel in figures["risk_coverage"]:
            parts.append(f"<div class='fig'><img src='{src(rel)}' alt='risk-coverage {e(b)} {e(d)} {shots} shots'>"
                         "</div>")
    if figures.get("reliability"):
        parts.append("<h2>Reliability diagrams (test predictions pooled over seeds)</h2><p>Each panel pools the "
                     "test predictions of all seeds of a cell, so its ECE is the pooled one, not the table's mean "
                     "over seeds.</p>")
        current = None
        for (shots, b, d), rel, label in figures["reliability"]:
            if (shots, b, d) != current:
                current = (shots, b, d)
                parts.append(f"<h3>{e(b)} · {e(d)} · {shots} shots</h3>")
            parts.append(f"<div class='fig'><img src='{src(rel)}' alt='{e(label)}'><br><small>{e(label)}</small></div>")
    intervals = interval_rows(collection)
    if intervals:
        parts.append("<h2>Test-set uncertainty of each run</h2><p>ECE and accuracy of every run with the 95% "
                     "percentile-bootstrap interval over its test images (intervals.csv). A table cell's spread "
                     "over seeds (±) is the variation from the shots; these intervals are the variation from "
                     "the finite test set.</p><table><thead><tr><th>run</th><th>seed</th><th>ECE (%)</th>"
                     "<th>accuracy (%)</th></tr></thead><tbody>")
        for shots, b, d, method, variant, seed, ece, e_lo, e_hi, acc, a_lo, a_hi, _n in intervals:
            row = f"{method} [{variant}]" if variant else method
            parts.append(f"<tr><td>{e(row)} · {e(b)} · {e(d)} · {shots} shots</td><td>{seed}</td>"
                         f"<td>{100 * ece:.2f} [{100 * e_lo:.2f}, {100 * e_hi:.2f}]</td>"
                         f"<td>{100 * acc:.2f} [{100 * a_lo:.2f}, {100 * a_hi:.2f}]</td></tr>")
        parts.append("</tbody></table>")
    flagged = [g for g in collection.groups if g.flags]
    if flagged:
        parts.append("<h2>‡ Flagged runs</h2><ul>")
        parts += [f"<li>{e(g.row)} · {e(g.backbone)} · {e(g.dataset)} · {g.shots} shots, {e(flag)}</li>"
                  for g in flagged for flag in g.flags]
        parts.append("</ul>")
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


def write_report(out_dir: str | Path, *, store_url: str | None = None, metrics: tuple[str, ...] = DEFAULT_METRICS,
                 convention: str = "standard", report_dir: str | Path | None = None,
                 diagrams: bool = True, self_contained: bool = False) -> dict[str, str]:
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
    if interval_rows(collection):
        paths["intervals"] = target / "intervals.csv"
        atomic_write_text(paths["intervals"], interval_csv(collection))
    figures: dict[str, list] = {"ece_accuracy": [], "reliability": [], "risk_coverage": [], "ablation": []}
    axis = ablation_axis(collection)
    rows = ablation_rows(collection, axis) if axis else []
    checked = all_claims(collection, rows)
    if checked["claims"]:
        paths["claims"] = target / "claims.json"
        atomic_write_json(paths["claims"], checked)
        figures["claims"] = checked["claims"]
    if axis:
        paths["ablation_csv"] = target / "ablation.csv"
        atomic_write_text(paths["ablation_csv"], ablation_csv(rows))
        for b, d in dict.fromkeys((r["backbone"], r["dataset"]) for r in rows):
            rel = f"figures/ablation/{slug(f'{axis}_{b}_{d}')}.png"
            mine = [r for r in rows if (r["backbone"], r["dataset"]) == (b, d)]
            if ablation_plot(mine, target / rel, f"{b} · {d}: accuracy and ECE against {axis}"):
                figures["ablation"].append((axis, rel, f"{b} · {d}"))
    for shots in dict.fromkeys(g.shots for g in collection.groups):
        rel = f"figures/ece_accuracy_{shots}shot.png"
        if ece_accuracy_plot(collection, shots, target / rel):
            figures["ece_accuracy"].append((shots, rel))
    if diagrams:
        cells: dict[tuple, list[Group]] = {}
        for g in collection.groups:
            if g.run_dirs:
                cells.setdefault((g.shots, g.backbone, g.dataset), []).append(g)
        for (shots, b, d), groups in cells.items():
            rel = f"figures/risk_coverage/{slug(f'{shots}shot_{b}_{d}')}.png"
            if risk_coverage_plot(groups, target / rel, f"{b} · {d} · {shots} shots"):
                figures["risk_coverage"].append(((shots, b, d), rel))
        for i, g in enumerate(collection.groups):
            rel = f"figures/reliability/{i:03d}_{slug(f'{g.shots}shot_{g.backbone}_{g.dataset}_{g.row}')}.png"
            if g.run_dirs and pooled_reliability(g, target / rel):
                figures["reliability"].append(((g.shots, g.backbone, g.dataset), rel, g.row))
    atomic_write_text(paths["html"], html_report(tables, collection, figures, embed=target if self_contained else None))
    return {k: str(v) for k, v in paths.items()}
