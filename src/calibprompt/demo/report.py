"""The demo's outputs: the summary rows, the text and Markdown tables, per-seed CSV, the reliability and
per-seed figures, and report.md."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.metrics.binning import equal_width_bins
from calibprompt.metrics.registry import metric_spec
from calibprompt.reporting.stats import values
from calibprompt.settings import atomic_write_bytes, atomic_write_text

#: (key in metrics.json, column title, shown as percent), from the metric registry
METRICS = tuple((m.name, m.title, m.percent) for m in map(metric_spec, (
    "accuracy", "ece", "mce", "adaptive_ece", "nll", "brier")))


def summarise(methods: list[dict], results: dict, dataset: str, seeds: list[int], eval_on: str = "test") -> list[dict]:
    rows = []
    for entry in methods:
        label = entry["label"]
        row: dict[str, Any] = {"method": entry["method"]["name"], "label": label, "dataset": dataset,
                               "evaluated_on": eval_on, "n_seeds": len(seeds), "seeds": seeds}
        any_result = results[label][seeds[0]]["result"]
        row["n_test"] = any_result["n_test"]
        row["backbone"] = any_result["backbone"]
        for key, _, _ in METRICS:
            v = values(results[label], key, seeds)
            row[f"{key}_mean"] = float(v.mean())
            row[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row[f"{key}_per_seed"] = v.tolist()
        ref_ece = np.array([float(results[label][s]["result"]["metrics_reference"]["ece"]) for s in seeds])
        row["ece_reference_mean"] = float(ref_ece.mean())  # the official code's ECE convention (Q4)
        row["ece_reference_std"] = float(ref_ece.std(ddof=1)) if len(seeds) > 1 else 0.0
        row["confidence_mean"] = float(values(results[label], "confidence", seeds).mean())
        for key in DECISION_METRICS:  # conformal sets and selective prediction, when the runs fitted them
            if all(key in results[label][s]["result"]["metrics"] for s in seeds):
                v = values(results[label], key, seeds)
                row[f"{key}_mean"], row[f"{key}_per_seed"] = float(v.mean()), v.tolist()
                row[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        conformal = results[label][seeds[0]]["result"].get("conformal")
        if conformal:
            row["conformal_alpha"], row["conformal_score"] = conformal["alpha"], conformal["score"]
        temps = [((results[label][s]["result"].get("posthoc") or {}).get("params") or {}).get("temperature")
                 for s in seeds]
        if any(t is not None for t in temps):
            row["temperature_per_seed"] = temps
        rows.append(row)
    return rows


DECISION_METRICS = ("cp_coverage", "cp_set_size", "cp_singleton", "cp_ccv", "aurc")


def format_conformal(rows: list[dict], reference: str | None, markdown: bool = False) -> str:
    """Coverage, mean set size, singleton share and class coverage gap of each method's conformal sets, and
    whether each CalibPrompt row gave smaller sets than the reference (CoOp-CE) at the same target."""
    rows = [r for r in rows if "cp_coverage_mean" in r]
    if not rows:
        return ""
    alpha, score = rows[0]["conformal_alpha"], rows[0]["conformal_score"]
    heads = ["Method", "Coverage (%)", "Set size", "Singletons (%)", "CCV (%)", "AURC (%)"]
    body = [[r["label"], _cell(r, "cp_coverage", True), _cell(r, "cp_set_size", False),
             _cell(r, "cp_singleton", True), _cell(r, "cp_ccv", True), _cell(r, "aurc", True)] for r in rows]
    title = (f"Conformal prediction sets ({score.upper()}, alpha {alpha}: target coverage {100 * (1 - alpha):.0f}%), "
             "calibrated on the validation shots")
    lines = table_lines(heads, body, markdown)
    if not markdown:
        lines = [title, *lines]
    return "\n".join([*lines, "", *set_size_readings(rows, reference)])


def set_size_readings(rows: list[dict], reference: str | None) -> list[str]:
    """Whether each CalibPrompt row's sets were smaller than the reference row's (reporting.stats)."""
    from calibprompt.reporting.stats import set_size_verdicts

    return set_size_verdicts([{"label": r["label"], "method": r["method"], "size": r["cp_set_size_mean"],
                               "coverage": r["cp_coverage_mean"]} for r in rows], reference) if reference else []


def _cell(row: dict, key: str, percent: bool) -> str:
    m, s = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{m * 100:.1f} ± {s * 100:.1f}" if percent else f"{m:.3f} ± {s:.3f}"


def table_lines(heads: list[str], body: list[list[str]], markdown: bool, left: int = 1, rule: bool = False
                ) -> list[str]:
    """A table as lines: Markdown (the first ``left`` columns left-aligned, the rest right-aligned), or
    plain text padded to column widths, the same alignment, with a dashed rule under the header if ``rule``."""
    if markdown:
        return ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(heads) - left)) + "|",
                *["| " + " | ".join(b) + " |" for b in body]]
    widths = [max(len(x[i]) for x in [heads] + body) for i in range(len(heads))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    head = line(heads)
    return [head, *(["-" * len(head)] if rule else []), *map(line, body)]


def format_table(rows: list[dict], markdown: bool = False) -> str:
    heads = ["Method"] + [f"{title} (%)" if pct else title for _, title, pct in METRICS]
    body = [[r["label"]] + [_cell(r, k, p) for k, _, p in METRICS] for r in rows]
    if markdown:
        return "\n".join(table_lines(heads, body, True))
    first = rows[0] if rows else {}
    title = (f"{first.get('dataset', '')} {first.get('evaluated_on', 'test')} split ({first.get('n_test', '?')} images), "
             f"mean ± std over {first.get('n_seeds', '?')} seeds, backbone {first.get('backbone', '')}")
    return "\n".join([title, *table_lines(heads, body, False, rule=True)])


def format_paired(paired: list[dict], reference: str | None) -> str:
    if not paired:
        return ""
    lines = [f"Paired per-seed differences against {reference} (method minus {reference}, points):"]
    for rec in paired:
        e, a = rec["ece"], rec["accuracy"]
        lines.append(
            f"  {rec['label']:<18} ECE {e['mean'] * 100:+5.2f} [{e['ci95'][0] * 100:+.2f}, {e['ci95'][1] * 100:+.2f}]"
            f" (per seed {', '.join(f'{x * 100:+.1f}' for x in e['per_seed'])});"
            f"  accuracy {a['mean'] * 100:+5.2f} (per seed {', '.join(f'{x * 100:+.1f}' for x in a['per_seed'])})")
        lines.append(f"  {'':<18} -> {rec['verdict']}")
    return "\n".join(lines)


def write_per_seed(path: Path, methods: list[dict], results: dict, seeds: list[int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "label", "seed", *[k for k, _, _ in METRICS], "ece_reference", "confidence",
                     "temperature", "run_dir"])
    for entry in methods:
        for s in seeds:
            res = results[entry["label"]][s]["result"]
            temp = ((res.get("posthoc") or {}).get("params") or {}).get("temperature")
            writer.writerow([entry["method"]["name"], entry["label"], s,
                             *[f"{res['metrics'][k]:.6f}" for k, _, _ in METRICS],
                             f"{res['metrics_reference']['ece']:.6f}", f"{res['metrics']['confidence']:.6f}",
                             "" if temp is None else f"{temp:.4f}", str(results[entry["label"]][s]["dir"])])
    atomic_write_text(path, buffer.getvalue())


def _pooled_predictions(results: dict[int, dict]) -> tuple[np.ndarray, np.ndarray]:
    """Test-set probabilities and labels of every seed, stacked (each seed predicts the same test set)."""
    from calibprompt.reporting.collect import read_predictions

    pairs = [read_predictions(Path(rec["dir"]) / "predictions.csv") for rec in results.values()]
    return np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs])


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def draw_figures(out: Path, methods: list[dict], results: dict, dataset, reference: str | None,
                 paired: list[dict], eval_on: str = "test") -> dict[str, str]:
    """reliability.png (one panel per method, test predictions of all seeds pooled) and
    paired_ece.png (per-seed ECE and accuracy of each method, lines join the same seed)."""
    from matplotlib.figure import Figure

    figures = {}
    n = len(methods)
    cols = min(n, 3)
    rows_ = math.ceil(n / cols)
    fig = Figure(figsize=(4.0 * cols, 4.6 * rows_))
    fig.subplots_adjust(hspace=0.55, wspace=0.3)
    for i, entry in enumerate(methods):
        ax = fig.add_subplot(rows_, cols, i + 1)
        probs, labels = _pooled_predictions(results[entry["label"]])
        conf = probs.max(axis=1)
        correct = (probs.argmax(axis=1) == labels).astype(float)
        bins = equal_width_bins(conf, correct, n_bins=10)  # the metrics' own binning (standard convention)
        ece = bins.expected_gap()
        acc, mconf, shown = bins.accuracy, bins.mean_conf, bins.stat_count > 0
        ax.bar(bins.lo[shown], acc[shown], width=0.1, align="edge", color="#4c72b0", edgecolor="black",
               linewidth=0.5, label="accuracy")
        ax.bar(bins.lo[shown], (mconf - acc)[shown], bottom=acc[shown], width=0.1, align="edge",
               color="#dd8452", alpha=0.45, edgecolor="#dd8452", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax2 = ax.twinx()
        ax2.hist(conf, bins=20, range=(0, 1), color="grey", alpha=0.25)
        ax2.set_yticks([])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{entry['label']}\npooled ECE {ece * 100:.1f}%, accuracy {correct.mean() * 100:.1f}%", fontsize=10)
        ax.set_xlabel("confidence")
        if i % cols == 0:
            ax.set_ylabel("accuracy")
        if i == 0:
            ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"Reliability on the {dataset.name} {eval_on} split, {len(next(iter(results.values())))} seeds pooled "
                 "(grey: confidence histogram)", fontsize=10)
    _save(fig, out / "reliability.png")
    figures["reliability"] = "reliability.png"

    seeds = sorted(next(iter(results.values())))
    fig = Figure(figsize=(10, 4))
    for j, (key, title) in enumerate((("ece", "ECE (%)"), ("accuracy", "Accuracy (%)"))):
        ax = fig.add_subplot(1, 2, j + 1)
        values = np.array([[results[m["label"]][s]["result"]["metrics"][key] * 100 for m in methods] for s in seeds])
        for k, s in enumerate(seeds):
            ax.plot(range(n), values[k], marker="o", alpha=0.7, label=f"seed {s}")
        ax.set_xticks(range(n))
        ax.set_xticklabels([m["label"] for m in methods], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if j == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"Per-seed values on the {dataset.name} {eval_on} split (lines join runs on the same shots)", fontsize=10)
    _save(fig, out / "per_seed.png")
    figures["per_seed"] = "per_seed.png"
    return figures


def write_report(path: Path, rows: list[dict], paired: list[dict], info: dict, figures: dict, methods: list[dict],
                 results: dict, reference: str | None) -> None:
    meta = info.get("model_meta") or {}
    lines = [f"# calibprompt demo: {info['dataset']}", ""]
    lines += [
        f"Backbone: `{info['model_dir']}`"
        + (f" (micro Med-VLM, {meta['parameters'] / 1e6:.1f} M parameters, logit scale "
           f"{'learned' if (meta.get('settings') or {}).get('logit_scale') is None else 'fixed at ' + str((meta.get('settings') or {}).get('logit_scale'))})"
           if meta else ""),
        f"Seeds: {info['seeds']}; {info['shots']} training shots and {info['val_shots']} validation shots per class; "
        f"evaluation: the {info['eval_on']} split" + (" minus the validation shots" if info["eval_on"] == "val" else "")
        + f", {rows[0]['n_test']} images, once per run.",
        f"Wall time: {info['timings']['total'] / 60:.1f} min (model {info['timings']['model'] / 60:.1f} min"
        f"{', pretrained now' if info['model_trained_now'] else ', reused'}; runs {info['timings']['runs'] / 60:.1f} min).",
        "",
        "## Results (mean ± std over seeds; standard-convention metrics)",
        "",
        format_table(rows, markdown=True),
        "",
        "ECE, MCE and adaptive ECE use 10 bins (MCE: the largest gap of a non-empty bin). "
        "The official code's ECE convention (`metrics_reference`) is in `summary.json` (`ece_reference_mean`).",
        "",
    ]
    if paired:
        lines += [f"## Paired per-seed differences against {reference}", "",
                  "Each seed uses the same training shots, validation shots and test images for every method, "
                  "so differences are paired. Points (percentage points); negative ECE difference = better "
                  "calibrated. The 95% interval is a t-interval over seeds.", "",
                  "| Method | ΔECE mean [95% CI] | ΔECE per seed | Δaccuracy mean | Δaccuracy per seed | reading |",
                  "|---|---|---|---|---|---|"]
        for rec in paired:
            e, a = rec["ece"], rec["accuracy"]
            lines.append(
                f"| {rec['label']} | {e['mean'] * 100:+.2f} [{e['ci95'][0] * 100:+.2f}, {e['ci95'][1] * 100:+.2f}] | "
                + ", ".join(f"{x * 100:+.1f}" for x in e["per_seed"]) + f" | {a['mean'] * 100:+.2f} | "
                + ", ".join(f"{x * 100:+.1f}" for x in a["per_seed"]) + f" | {rec['verdict']} |")
        lines.append("")
    conformal = format_conformal(rows, reference, markdown=True)
    if conformal:
        first = next(r for r in rows if "cp_coverage_mean" in r)
        lines += [f"## Conformal prediction sets ({first['conformal_score'].upper()}, alpha {first['conformal_alpha']})",
                  "", "Split conformal sets calibrated on each seed's validation shots after any post-hoc "
                  "calibrator (docs/deploy.md); target coverage "
                  f"{100 * (1 - first['conformal_alpha']):.0f}%. Smaller sets at the same coverage are more useful; "
                  "CCV is the mean gap between each class's coverage and the target.", "", conformal, ""]
    lines += ["## Reliability diagrams", "",
              f"![reliability]({figures['reliability']})", "",
              "Test predictions of all seeds pooled per method. Each run's own diagram is "
              "`runs/<method>/seed<k>/reliability.png`. A `+ TS` row evaluates the prompts of the row it "
              "calibrates (same seed) with a temperature fitted on the validation shots.", "",
              f"![per seed]({figures['per_seed']})", "",
              "## What was used for what", "",
              "- **Pretraining** (micro model): the train split of "
              + ", ".join(f"{s['name']} ({s['pretrain_images']} images)" for s in meta.get("sources", []))
              + ", minus a reserved downstream pool per class. No val or test image." if meta else
              "- **Backbone**: used as it is (not pretrained here).",
              "- **Training shots**: drawn per seed from the downstream pool (train split images the micro "
              "model never saw).",
              "- **Validation shots**: drawn per seed from the val split; used only to fit temperature scaling.",
              "- **Test split**: evaluated once per run; nothing is selected or tuned on it.",
              "- Split files: `splits/`; every run's config, split, predictions and metrics: `runs/`.", "",
              "## Settings", "", "```json", json.dumps(info["run"], indent=2), "```", ""]
    if info.get("notes"):
        lines += ["## Warnings raised by the runs", ""] + [f"- {n}" for n in info["notes"]] + [""]
    atomic_write_text(path, "\n".join(lines + _kept_sections(path)))


def _kept_sections(path: Path) -> list[str]:
    """The ablation sections (``demo --ablation``) of an earlier report.md, carried over when it is rewritten."""
    if not path.is_file():
        return []
    import re

    return [m.group(0) + "\n" for m in re.finditer(r"<!-- ablation:(\w+) -->.*?<!-- ablation:\1 -->", path.read_text(), re.S)]


def replace_section(out: Path, marker: str, section: str, fallback: str) -> None:
    """Put ``section`` (which starts and ends with ``marker``) into ``out/report.md``, replacing an earlier
    one with the same marker; without a report.md (the demo table never ran there) into ``out/fallback``."""
    report = out / "report.md"
    if not report.is_file():
        atomic_write_text(out / fallback, section + "\n")
        return
    text = report.read_text()
    if marker in text:
        head, _, rest = text.partition(marker)
        _, _, tail = rest.partition(marker)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(report, text)
