"""``calibprompt demo --robustness``: PromptSmooth and the angular loss under Gaussian noise, certified,
on the micro model (docs/robustness.md).

CoOp-CE and CalibPrompt (the demo config's rows, clean training) and PromptSmooth / PromptSmooth + AS
(trained on views with noise sigma) run on every seed with the demo's protocol (its run config, splits
and feature cache); then each run is certified on the same class-balanced test subset with the same
noise draws (encoded once for all runs). Outputs in the demo folder: ``robustness.json`` (one row per
method: accuracy and ECE of single noisy draws and of the smoothed votes, abstain rate, certified
accuracy per radius; mean, std and per seed; paired per-seed differences of PromptSmooth + AS against
PromptSmooth), ``figures/robustness.png`` and a section of ``report.md``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.demo.config import load_demo_config, parse_seeds
from calibprompt.demo.report import replace_section, table_lines
from calibprompt.reporting.stats import paired_test
from calibprompt.settings import atomic_write_bytes, atomic_write_json

SIGMA = 0.25
N0, N, ALPHA, IMAGES = 10, 200, 0.001, 200  # sized for the demo's time budget (docs/robustness.md)
RADII = (0.0, 0.125, 0.25, 0.375, 0.5)
MARKER = "<!-- robustness -->"
CLEAN = ("coop-ce", "calibprompt")


def methods(cfg: dict, sigma: float) -> list[dict]:
    """The four rows: the demo config's CoOp-CE and CalibPrompt, and PromptSmooth without and with AS."""
    rows = [m for m in cfg["methods"] if m["method"]["name"] in CLEAN]
    if {m["method"]["name"] for m in rows} != set(CLEAN):
        raise ValueError("the demo config needs rows for coop-ce and calibprompt to run the robustness study")
    return rows + [{"label": "PromptSmooth", "method": {"name": "promptsmooth", "sigmas": [sigma]}},
                   {"label": "PromptSmooth + AS", "method": {"name": "promptsmooth-as", "sigmas": [sigma]}}]


def run_robustness(out: str | Path, dataset: str | None = None, seeds: Any = None, config: str | Path | None = None,
                   model: str | Path | None = None, quiet: bool = False, sigma: float = SIGMA, n0: int = N0,
                   n: int = N, alpha: float = ALPHA, max_images: int = IMAGES) -> dict:
    from calibprompt.demo.pipeline import Progress, _data, _model, _runs
    from calibprompt.features import FeatureCache
    from calibprompt.robustness.smoothing import CertifySettings, accuracy_plot, certify_run
    from calibprompt.robustness.certify import check_settings
    from calibprompt.settings import cache_dir

    check_settings(sigma, alpha, n0, n)
    start = time.perf_counter()
    say = Progress(quiet)
    cfg = load_demo_config(config)
    seed_list = parse_seeds(seeds if seeds is not None else cfg["seeds"])
    out = Path(out).expanduser()
    data_cfg, ds, is_flag = _data(str(dataset or cfg["dataset"]), quiet, say)
    model_dir, _meta, _trained = _model(cfg, ds, data_cfg, is_flag, model, False, None, quiet, say)
    study = copy.deepcopy(cfg)
    study["methods"] = methods(cfg, sigma)
    say(f"robustness: {len(study['methods'])} methods x {len(seed_list)} seeds, sigma {sigma}")
    results, _notes = _runs(study, out / "robustness", ds, data_cfg, model_dir, seed_list, "test", say)
    cache = FeatureCache(cache_dir() / "features")
    reports: dict[str, list[dict]] = {m["label"]: [] for m in study["methods"]}
    for seed in seed_list:
        for entry in study["methods"]:
            run_dir = Path(results[entry["label"]][seed]["dir"])
            settings = CertifySettings(sigma=sigma, n0=n0, n=n, alpha=alpha, radii=RADII, max_images=max_images,
                                       allow_clean=True)
            rep = certify_run(run_dir, settings, out_dir=run_dir / "certify", cache=cache)
            reports[entry["label"]].append(rep)
            say(f"    certified seed {seed} {entry['label']:<18} single-draw accuracy "
                f"{100 * rep['single_draw']['accuracy']:5.1f}% ECE {100 * rep['single_draw']['ece']:5.2f}%  "
                f"certified@0 {100 * rep['certified_accuracy']['0.0']:5.1f}%")
    rows = [_row(label, reps, seed_list) for label, reps in reports.items()]
    paired = _paired(reports, seed_list)
    figure = out / "figures" / "robustness.png"
    atomic_write_bytes(figure, accuracy_plot([_mean_report(reps) for reps in reports.values()], list(reports)))
    info = {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "max_images": max_images, "radii": list(RADII),
            "seeds": seed_list, "dataset": ds.name, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "robustness.json", {"settings": info, "rows": rows, "paired": paired})
    text = format_robustness(rows) + "\n" + _paired_line(paired)
    _write_section(out, rows, paired, info, figure)
    say(f"robustness done in {(time.perf_counter() - start) / 60:.1f} min; {out / 'robustness.json'}, {figure}")
    return {"rows": rows, "paired": paired, "settings": info, "figure": str(figure), "text": text}


def _values(reps: list[dict], path: tuple[str, ...]) -> list[float]:
    out = []
    for rep in reps:
        value: Any = rep
        for key in path:
            value = value[key]
        out.append(float(value))
    return out


METRICS = {"noisy_accuracy": ("single_draw", "accuracy"), "noisy_ece": ("single_draw", "ece"),
           "noisy_nll": ("single_draw", "nll"), "smoothed_accuracy": ("smoothed_accuracy",),
           "votes_ece": ("smoothed_votes", "ece"), "abstain_rate": ("abstain_rate",), "clean_accuracy": ("clean", "accuracy"),
           "clean_ece": ("clean", "ece")}


def _row(label: str, reps: list[dict], seeds: list[int]) -> dict:
    row: dict[str, Any] = {"label": label, "method": reps[0]["method"], "n_seeds": len(reps), "seeds": seeds}
    for name, path in METRICS.items():
        v = np.array(_values(reps, path))
        row[name] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                     "per_seed": v.tolist()}
    row["certified_accuracy"] = {}
    for r in reps[0]["certified_accuracy"]:
        v = np.array([rep["certified_accuracy"][r] for rep in reps])
        row["certified_accuracy"][r] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}
    return row


def _mean_report(reps: list[dict]) -> dict:
    return {**reps[0], "certified_accuracy": {r: float(np.mean([rep["certified_accuracy"][r] for rep in reps]))
                                              for r in reps[0]["certified_accuracy"]}}


def _paired(reports: dict[str, list[dict]], seeds: list[int]) -> dict:
    """PromptSmooth + AS minus PromptSmooth per seed (same split, same noise draws)."""
    a, b = reports["PromptSmooth + AS"], reports["PromptSmooth"]
    out = {"label": "PromptSmooth + AS", "reference": "PromptSmooth", "seeds": seeds}
    for name in ("noisy_ece", "noisy_accuracy", "votes_ece", "smoothed_accuracy"):
        x, y = np.array(_values(a, METRICS[name])), np.array(_values(b, METRICS[name]))
        test = paired_test(x, y)
        out[name] = {"per_seed": (x - y).tolist(), "mean": test["mean"], "ci95": list(test["ci"]),
                     "wilcoxon_p": test["wilcoxon_p"], "n_lower": int((x < y).sum())}
    return out


def _paired_line(paired: dict) -> str:
    e, acc = paired["noisy_ece"], paired["noisy_accuracy"]
    n = len(paired["seeds"])
    return (f"PromptSmooth + AS vs PromptSmooth (single noisy draw, paired over {n} seeds): ECE "
            f"{100 * e['mean']:+.2f} points [95% CI {100 * e['ci95'][0]:+.2f}, {100 * e['ci95'][1]:+.2f}], lower in "
            f"{e['n_lower']}/{n} seeds; accuracy {100 * acc['mean']:+.2f} points [{100 * acc['ci95'][0]:+.2f}, "
            f"{100 * acc['ci95'][1]:+.2f}]")


def format_robustness(rows: list[dict], markdown: bool = False) -> str:
    radii = list(rows[0]["certified_accuracy"])
    heads = ["Method", "noisy acc", "noisy ECE", "votes ECE", "smoothed acc", "abstain"] + \
        [f"cert@{float(r):g}" for r in radii]

    def cell(stat: dict) -> str:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"

    body = [[r["label"], cell(r["noisy_accuracy"]), cell(r["noisy_ece"]), cell(r["votes_ece"]),
             cell(r["smoothed_accuracy"]), cell(r["abstain_rate"])] + [cell(r["certified_accuracy"][x]) for x in radii]
            for r in rows]
    return "\n".join(table_lines(heads, body, markdown, left=1))


def _write_section(out: Path, rows: list[dict], paired: dict, info: dict, figure: Path) -> None:
    lines = [MARKER, f"## Robustness: Gaussian noise sigma {info['sigma']} ({info['dataset']}, {len(info['seeds'])} seeds)",
             "", format_robustness(rows, markdown=True), "", f"![certified accuracy]({figure.relative_to(out)})", "",
             f"Percent, mean ± std over seeds, on {info['max_images']} test images (class by class). noisy: one "
             f"noise draw per image; votes / smoothed: the smoothed classifier of {info['n']} draws (CERTIFY with "
             f"n0 = {info['n0']}, alpha = {info['alpha']}); cert@r: certified accuracy at l2 radius r. CoOp-CE and "
             "CalibPrompt were trained on clean images, PromptSmooth rows on noisy ones.", "",
             "- " + _paired_line(paired), "", MARKER]
    replace_section(out, MARKER, "\n".join(lines), "robustness.md")
