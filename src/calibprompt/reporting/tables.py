"""Paper-style tables of a collected sweep: one per (shots, backbone), methods x (datasets x metrics),
mean +- std over seeds, best bold and second underlined per column; as Markdown, LaTeX and CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from calibprompt.metrics.registry import METRICS
from calibprompt.reporting.collect import Collection, Group

DEFAULT_METRICS = ("accuracy", "ece", "mce", "ace")
#: metric -> (column label, higher is better (None: not ranked), shown in percent); from the metric registry
METRIC_INFO: dict[str, tuple[str, bool | None, bool]] = {
    m.name: (m.label, m.higher_is_better, m.percent) for m in METRICS.values()}
DECIMALS = {True: 2, False: 3}  # percent -> 2 decimals, raw -> 3


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
                    st = g.stat(m) if g and not g.flags else None  # a flagged cell is never "best"
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
    a trailing ``†`` when fewer seeds finished than were planned, ``‡`` when a run of the cell is flagged
    (did not learn, accuracy at the majority rate, temperature at its bound; never ranked best)."""
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
    if group.flags:
        text += " ‡"
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
             "† = fewer seeds finished than planned; ‡ = a run of the cell is flagged (listed below, never "
             "ranked).", ""]
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
    flagged = [g for g in collection.groups if g.flags]
    if flagged:
        out += ["## ‡ Flagged runs", ""]
        out += [f"- {_md_escape(g.row)} · {g.backbone} · {g.dataset} · {g.shots} shots, {flag}"
                for g in flagged for flag in g.flags]
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


INTERVAL_COLUMNS = ("shots", "backbone", "dataset", "method", "variant", "seed", "ece", "ece_low", "ece_high",
                    "accuracy", "accuracy_low", "accuracy_high", "n_resamples")


def interval_rows(collection: Collection) -> list[list]:
    """One row per finished run that recorded them: its test ECE and accuracy with their 95% bootstrap
    interval over the test images (fractions, the standard convention whatever the report's)."""
    rows = []
    for g in collection.groups:
        by_seed = dict(zip(g.seeds, zip(g.values.get("ece", []), g.values.get("accuracy", []))))
        for ci in g.intervals:
            ece, acc = by_seed.get(ci["seed"], (float("nan"), float("nan")))
            if "point" in ci:  # the values the interval was computed around
                ece, acc = ci["point"]["ece"], ci["point"]["accuracy"]
            rows.append([g.shots, g.backbone, g.dataset, g.method, g.variant, ci["seed"], ece, *ci["ece"],
                         acc, *ci["accuracy"], ci["n_resamples"]])
    return rows


def interval_csv(collection: Collection) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(INTERVAL_COLUMNS)
    writer.writerows([[repr(v) if isinstance(v, float) else v for v in row] for row in interval_rows(collection)])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- figures


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
