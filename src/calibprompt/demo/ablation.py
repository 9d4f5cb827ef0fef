"""``calibprompt demo --ablation shots|ctx``: the paper's few-shot and context-length studies on the micro
model, with the demo's protocol (its run config, splits and feature cache; docs/demo.md).

For each axis value (shots 1, 2, 4, 8, 16, or context tokens 4, 8, 16, 24 at the demo's shots) CoOp-CE and
CalibPrompt (the demo config's rows of those methods, with their parameters) run on every seed. Outputs
in the demo folder: ``ablation.json`` ({axis: rows of method, value, accuracy and ECE mean/std/per seed}),
``figures/ablation_<axis>.png`` (accuracy and ECE against the axis with 95% bands, as ``calibprompt
report`` draws them), the claims the paper makes about the axis checked on these numbers, and a section
of ``report.md``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.demo.config import load_demo_config, parse_seeds
from calibprompt.demo.report import replace_section, table_lines
from calibprompt.reporting.ablation import ablation_plot
from calibprompt.reporting.claims import ablation_claims
from calibprompt.reporting.stats import t_interval
from calibprompt.settings import atomic_write_json

# The paper's context lengths go to 32; the micro model's text encoder holds 32 tokens in all, so 32 context
# tokens plus start, class name, "." and end do not fit: its study stops at 24.
AXES = {"shots": ("shots", (1, 2, 4, 8, 16)), "ctx": ("prompt.n_ctx", (4, 8, 16, 24))}
METHODS = ("coop-ce", "calibprompt")
DEFAULT_SEEDS = [1, 2, 3]
SECTION = "<!-- ablation:{axis} -->"


def run_ablation(out: str | Path, axis: str, dataset: str | None = None, seeds: Any = None,
                 config: str | Path | None = None, model: str | Path | None = None, quiet: bool = False) -> dict:
    """Run one study into ``out`` and return ``{"axis", "rows", "claims", "figure"}``."""
    from calibprompt.demo.pipeline import Progress, _data, _model, _runs

    if axis not in AXES:
        raise ValueError(f"--ablation must be one of {', '.join(AXES)}, got {axis!r}")
    key, values = AXES[axis]
    start = time.perf_counter()
    say = Progress(quiet)
    cfg = load_demo_config(config)
    seed_list = parse_seeds(seeds) if seeds is not None else list(DEFAULT_SEEDS)
    out = Path(out).expanduser()
    data_cfg, ds, is_flag = _data(str(dataset or cfg["dataset"]), quiet, say)
    model_dir, _meta, _trained = _model(cfg, ds, data_cfg, is_flag, model, False, None, quiet, say)
    entries = [m for m in cfg["methods"] if m["method"]["name"] in METHODS]
    if {m["method"]["name"] for m in entries} != set(METHODS):
        raise ValueError(f"the demo config needs rows for {', '.join(METHODS)} to run the ablation")
    rows: list[dict] = []
    for value in values:
        study = copy.deepcopy(cfg)
        study["methods"] = entries
        run_cfg = study["run"] = dict(study.get("run") or {})
        if key == "shots":
            run_cfg["shots"] = value
        else:
            run_cfg["prompt"] = {**(run_cfg.get("prompt") or {}), "n_ctx": value}
        say(f"ablation {axis} = {value}")
        results, _notes = _runs(study, out / "ablation" / f"{axis}-{value}", ds, data_cfg, model_dir, seed_list, "test",
                                say)
        for entry in entries:
            per_seed = [results[entry["label"]][s]["result"]["metrics"] for s in seed_list]
            row = {"method": entry["method"]["name"], "label": entry["label"], "axis": key, "value": float(value),
                   "backbone": "micro", "dataset": ds.name, "n": len(seed_list), "seeds": seed_list}
            for metric in ("accuracy", "ece"):
                v = np.array([m[metric] for m in per_seed])
                low, high = t_interval(v)
                row.update({f"{metric}_mean": float(v.mean()), f"{metric}_std": float(v.std(ddof=1)) if len(v) > 1
                            else 0.0, f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                            f"{metric}_per_seed": v.tolist()})
            rows.append(row)
    figure = out / "figures" / f"ablation_{axis}.png"
    ablation_plot([{**r, "method": r["label"]} for r in rows], figure,
                  f"micro model · {ds.name} · {len(seed_list)} seeds: accuracy and ECE against {key}")
    claims = [c.__dict__ for c in ablation_claims(rows)]
    stored = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").is_file() else {}
    stored[axis] = {"rows": rows, "claims": claims, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "ablation.json", stored)
    _write_section(out, axis, key, rows, claims, figure, len(seed_list), ds.name)
    table = format_ablation(rows, key)
    text = "\n".join([table] + [f"{c['statement']}: {c['verdict']} ({c['evidence']})" for c in claims])
    say(f"ablation {axis} done in {(time.perf_counter() - start) / 60:.1f} min; {out / 'ablation.json'}, {figure}")
    return {"axis": axis, "rows": rows, "claims": claims, "figure": str(figure), "table": table, "text": text}


def format_ablation(rows: list[dict], key: str, markdown: bool = False) -> str:
    """Accuracy and ECE (%) per method and axis value, mean ± std over seeds."""
    values = sorted({r["value"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["value"]): r for r in rows}
    heads = ["Method", "metric"] + [f"{key}={v:g}" for v in values]
    body = [[label, name] + [f"{100 * cell[(label, v)][f'{m}_mean']:.1f} ± {100 * cell[(label, v)][f'{m}_std']:.1f}"
                             for v in values]
            for label in labels for m, name in (("accuracy", "accuracy (%)"), ("ece", "ECE (%)"))]
    return "\n".join(table_lines(heads, body, markdown, left=2))


def _write_section(out: Path, axis: str, key: str, rows: list[dict], claims: list[dict], figure: Path, n_seeds: int,
                   dataset: str) -> None:
    """The study's section of report.md (replacing an earlier one of the same axis), or ablation_<axis>.md."""
    marker = SECTION.format(axis=axis)
    lines = [marker, f"## Ablation: {key} ({dataset}, {n_seeds} seeds)", "",
             format_ablation(rows, key, markdown=True), "",
             f"![ablation {axis}]({figure.relative_to(out)})", "", "Mean ± std over seeds; the band in the figure "
             "is the 95% t-interval. The paper's statement about this axis, checked on these numbers:", ""]
    lines += [f"- {c['statement']}: **{c['verdict']}** ({c['evidence']})" for c in claims] + ["", marker]
    replace_section(out, marker, "\n".join(lines), f"ablation_{axis}.md")
