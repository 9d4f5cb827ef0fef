"""``calibprompt demo``: the whole method, end to end, on real medical images, with one command.

1. find the data (``$CALIBPROMPT_DATA``, the medmnist package's folder, else its download);
2. pretrain the micro Med-VLM when it is missing (:mod:`calibprompt.pretrain`);
3. for every seed, one few-shot split (training shots from the downstream pool that pretraining never
   saw, validation shots from the val split, the whole test split for evaluation), then every method
   through :func:`calibprompt.engine.run.run` with ONE shared feature cache, so each image view is encoded once;
4. a table (mean +- std over seeds), paired per-seed differences against the reference method (CoOp-CE),
   a Markdown report with reliability diagrams, ``summary.json`` (a list of rows), ``per_seed.csv``.

Nothing is tuned here: every setting comes from the demo config (``configs/demo.yaml``).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from calibprompt.settings import atomic_write_bytes, atomic_write_json, atomic_write_text, cache_dir

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_KEYS = ("dataset", "seeds", "pretrain", "run", "reference", "methods", "eval_on")
METRICS = (  # (key in metrics.json, column title, shown as percent)
    ("accuracy", "Accuracy", True), ("ece", "ECE", True), ("mce", "MCE", True),
    ("adaptive_ece", "Adaptive ECE", True), ("nll", "NLL", False), ("brier", "Brier", False),
)
STATE_FILE = "demo_state.json"
RUN_THREADS = 1  # torch threads during the prompt-tuning runs


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def load_demo_config(path: str | Path | None = None) -> dict:
    """The demo config (``configs/demo.yaml`` when ``path`` is None), checked for unknown keys."""
    from calibprompt.config import ConfigError, yaml_load

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"demo config {path} does not exist")
    cfg = yaml_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if path != DEFAULT_CONFIG:  # a user's file may leave keys out: fill them from the default
        base = yaml_load(DEFAULT_CONFIG.read_text())
        cfg = {**base, **cfg}
    unknown = sorted(set(cfg) - set(DEMO_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown demo key(s) {unknown}; valid keys: {list(DEMO_KEYS)}")
    labels = [m.get("label") for m in cfg["methods"]]
    if len(set(labels)) != len(labels) or not all(labels):
        raise ConfigError(f"{path}: every method needs a distinct label, got {labels}")
    return cfg


def parse_seeds(value: Any) -> list[int]:
    """``5`` -> [1..5]; ``"1,3,7"`` or a list -> those seeds."""
    if isinstance(value, (list, tuple)):
        seeds = [int(v) for v in value]
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        seeds = list(range(1, int(value) + 1))
    else:
        seeds = [int(v) for v in str(value).split(",") if v.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a count or a list of distinct integers, got {value!r}")
    return seeds


def resolve_dataset(spec: str, quiet: bool = False) -> tuple[dict, bool]:
    """``data:`` config for ``spec`` (a MedMNIST flag, a data YAML, a folder, a CSV or an .npz path)
    and whether it is a MedMNIST flag."""
    from calibprompt.config import yaml_load
    from calibprompt.data import config_for_path
    from calibprompt.pretrain import medmnist_data_cfg, task_text

    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec and not spec.endswith((".yaml", ".yml", ".npz")):
        return medmnist_data_cfg(spec.lower(), quiet=quiet), True
    if path.suffix.lower() in (".yaml", ".yml"):
        loaded = yaml_load(path.read_text()) or {}
        data = loaded.get("data", loaded) if isinstance(loaded, dict) else None
        if not isinstance(data, dict) or "source" not in data:
            raise ValueError(f"{path}: expected a data: section with source and path (see docs/data.md)")
        return dict(data), False
    data = config_for_path(path)
    if data["source"] == "medmnist":
        data.setdefault("template", task_text(path.stem).zero_shot)
    return data, False


# ------------------------------------------------------------------------------------------------
# Splits: training shots from the downstream pool, validation shots from the val split
# ------------------------------------------------------------------------------------------------

def _restricted(dataset, train_samples: list):
    """A view of ``dataset`` whose train split is only ``train_samples`` (refs unchanged)."""
    from calibprompt.data import ImageDataset

    keep = set(s.ref for s in train_samples)
    samples = [s for s in dataset.samples if s.split != "train" or s.ref in keep]

    class _View(ImageDataset):
        source = dataset.source

        def _read(self, sample):
            return dataset.load(sample.ref)

        def _hash(self, sample):
            return dataset.content_hash(sample.ref)

    return _View(dataset.name, dataset.classnames, dataset.template, samples, location=dataset.location,
                 test_fraction=dataset.test_fraction)


def write_splits(dataset, seeds: list[int], shots: int, val_shots: int, folder: Path,
                 eval_on: str = "test") -> dict[int, Path]:
    """One split file per seed: training shots from the micro model's downstream pool, validation
    shots from the val split (or, without one, the next images of the pool), and as evaluation set the
    whole test split, or with ``eval_on="val"`` the val images that are not validation shots (for
    investigations and tuning that must not look at the test split)."""
    from calibprompt.data import make_split
    from calibprompt.pretrain import downstream_pool

    if not dataset.has_split:
        raise ValueError(f"dataset {dataset.name!r} has no train/test split; the demo needs one "
                         "(use a folder with train/ and test/, or a MedMNIST file)")
    if eval_on not in ("test", "val"):
        raise ValueError(f"eval_on must be 'test' or 'val', got {eval_on!r}")
    if eval_on == "val" and not dataset.samples_in("val"):
        raise ValueError(f"dataset {dataset.name!r} has no val split to evaluate on")
    view = _restricted(dataset, downstream_pool(dataset))
    out = {}
    for seed in seeds:
        split = make_split(view, shots=shots, seed=seed, val_shots=val_shots)
        data = split.to_dict()
        data["fingerprint"] = dataset.fingerprint()
        if eval_on == "val":
            used = {item["ref"] for item in data["val"]}
            data["test"] = [{"ref": s.ref, "label": s.label, "sha256": dataset.content_hash(s)}
                            for s in dataset.samples_in("val") if s.ref not in used]
        data["note"] = ("training shots from the downstream pool that micro pretraining never saw; "
                        f"validation shots from the {split.val_source} split; evaluation: "
                        + ("the whole test split" if eval_on == "test" else "val images that are not validation shots"))
        path = folder / f"{dataset.name}-seed{seed}{'' if eval_on == 'test' else '-evalval'}.json"
        atomic_write_json(path, data)
        out[seed] = path
    return out


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------

class Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed()}] {msg}", file=sys.stderr, flush=True)

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def run_demo(out: str | Path, dataset: str | None = None, seeds: Any = None, config: str | Path | None = None,
             model: str | Path | None = None, quiet: bool = False, retrain: bool = False,
             pretrain_overrides: dict | None = None, eval_on: str | None = None) -> dict:
    """Run the demo into ``out`` and return ``{"rows": summary rows, "paired": ..., ...}``."""
    import torch

    from calibprompt.config import load_config
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache
    from calibprompt.pretrain import DEFAULT_SOURCES, PretrainSettings, ensure_model, medmnist_data_cfg, read_meta
    from calibprompt.engine.run import run

    t_start = time.perf_counter()
    say = Progress(quiet)
    cfg = load_demo_config(config)
    spec = str(dataset or cfg["dataset"])
    seed_list = parse_seeds(seeds if seeds is not None else cfg["seeds"])
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # 1. data
    say(f"1/4 data: {spec}")
    data_cfg, is_flag = resolve_dataset(spec, quiet)
    ds = open_dataset(data_cfg)
    counts = ds.counts()
    say(f"    {ds.name}: {len(ds.classnames)} classes {ds.classnames}; images per split "
        + ", ".join(f"{k or 'all'} {sum(v)}" for k, v in counts.items()))
    timings["data"] = time.perf_counter() - t_start

    # 2. model
    t = time.perf_counter()
    meta, trained = None, False
    if model is not None and not retrain and (Path(model).expanduser() / "open_clip_config.json").is_file():
        model_dir = Path(model).expanduser()
        meta = read_meta(model_dir)
        if meta is None:
            from calibprompt.backbones.open_clip_model import find_weights

            if find_weights(model_dir) is None:
                raise FileNotFoundError(f"--model {model_dir}: open_clip_config.json but no weights there; "
                                        "download them, or omit --model to use (and pretrain) the micro model")
        say(f"2/4 model: {model_dir}" + ("" if meta else " (not a micro model: used as it is)"))
    else:
        if is_flag and ds.name in DEFAULT_SOURCES:
            source_cfgs = [data_cfg if name == ds.name else medmnist_data_cfg(name, quiet=quiet)
                           for name in DEFAULT_SOURCES]
        else:
            source_cfgs = [data_cfg]
        settings = PretrainSettings(**_known(PretrainSettings, {**(cfg.get("pretrain") or {}),
                                                                **(pretrain_overrides or {})}))
        from calibprompt.pretrain import model_dir as default_dir

        folder = Path(model).expanduser() if model else default_dir(
            [str(c.get("name") or Path(c["path"]).stem) for c in source_cfgs])
        exists = read_meta(folder) is not None and not retrain
        say(f"2/4 micro model: {'found' if exists else 'pretraining it (a few minutes, once)'}: {folder}")
        model_dir, meta, trained = ensure_model(source_cfgs, folder, settings, progress=not quiet, retrain=retrain,
                                                log=say)
    if meta:
        names = [s["name"] for s in meta.get("sources", [])]
        zs = meta["history"][-1]["val_zero_shot_accuracy"] if meta.get("history") else {}
        say("    micro model pretrained on " + ", ".join(names) + "; zero-shot accuracy on their val splits: "
            + ", ".join(f"{k} {v * 100:.1f}%" for k, v in zs.items()))
        if ds.name not in names:
            say(f"    note: {ds.name} was not among its pretraining datasets")
    timings["model"] = time.perf_counter() - t

    # 3. runs
    t = time.perf_counter()
    run_cfg = cfg["run"] or {}
    shots, val_shots = int(run_cfg.get("shots", 8)), int(run_cfg.get("val_shots", 0))
    weights = _weights_id(model_dir)
    runs_root = out / "runs"
    _reset_if_stale(out, {"weights": weights, "dataset": ds.fingerprint(), "run": run_cfg,
                          "shots": shots, "val_shots": val_shots, "eval_on": eval_on or cfg.get("eval_on") or "test"},
                    runs_root)
    eval_on = eval_on or cfg.get("eval_on") or "test"
    split_files = write_splits(ds, seed_list, shots, val_shots, out / "splits", eval_on=eval_on)
    cache = FeatureCache(cache_dir() / "features")
    methods = cfg["methods"]
    total = len(seed_list) * len(methods)
    say(f"3/4 prompt tuning: {len(methods)} methods x {len(seed_list)} seeds = {total} runs "
        f"({shots} shots/class, {val_shots} val shots/class; evaluated on the {eval_on} split)")
    results: dict[str, dict[int, dict]] = {m["label"]: {} for m in methods}
    notes: list[str] = []  # distinct warnings raised by the runs (shown once, and in the report)
    done = 0
    # Prompt tuning runs a tiny text encoder on a few prompts per step: one thread is as fast as two on
    # an idle machine and several times faster on a busy one (no thread barrier per small op).
    threads = torch.get_num_threads()
    torch.set_num_threads(RUN_THREADS)
    try:
        for seed in seed_list:
            for entry in methods:
                base = copy.deepcopy(run_cfg)
                base.update({"seed": seed, "split_file": str(split_files[seed]), "backbone": {"path": str(model_dir)},
                             "data": data_cfg, "method": copy.deepcopy(entry["method"]),
                             "name": f"{entry['label']} · {ds.name} · seed {seed}"})
                run_cfg_full = load_config(None, base=base)
                folder = runs_root / _slug(entry["label"]) / f"seed{seed}"
                # "<method>+ts" evaluates the prompts its base method learned on the same seed (same split,
                # same settings) with a temperature fitted on the validation shots: no second training.
                base_prompt = _base_prompt(entry, methods, results, seed)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = run(run_cfg_full, folder, quiet=True, cache=cache, overwrite=True, head_from=base_prompt)
                for w in caught:
                    text = f"{entry['label']}: {w.message}"
                    if text not in notes:
                        notes.append(text)
                        say(f"    note: {text}")
                results[entry["label"]][seed] = {"dir": folder, "result": result}
                done += 1
                m = result["metrics"]
                say(f"    [{done:2d}/{total}] seed {seed} {entry['label']:<18} accuracy {m['accuracy'] * 100:5.1f}%  "
                    f"ECE {m['ece'] * 100:5.2f}%  NLL {m['nll']:.3f}")
    finally:
        torch.set_num_threads(threads)
    timings["runs"] = time.perf_counter() - t

    # 4. summary and report
    t = time.perf_counter()
    say("4/4 summary and report")
    rows = summarise(methods, results, ds.name, seed_list, eval_on)
    reference = _label_of(methods, cfg.get("reference"))
    paired = paired_differences(methods, results, reference, seed_list)
    write_per_seed(out / "per_seed.csv", methods, results, seed_list)
    figures = draw_figures(out, methods, results, ds, reference, paired, eval_on)
    atomic_write_json(out / "summary.json", rows)
    atomic_write_json(out / "paired.json", paired)
    timings["report_figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    info = {
        "dataset": ds.name, "data": data_cfg, "seeds": seed_list, "model_dir": str(model_dir),
        "model_trained_now": trained, "model_meta": _meta_summary(meta), "timings": timings,
        "counts": counts, "shots": shots, "val_shots": val_shots, "run": run_cfg, "eval_on": eval_on,
        "torch_threads": torch.get_num_threads(), "notes": notes,
    }
    atomic_write_json(out / "demo.json", info)
    write_report(out / "report.md", rows, paired, info, figures, methods, results, reference)
    table = format_table(rows)
    print(table)
    print(format_paired(paired, reference))
    say(f"done in {timings['total'] / 60:.1f} min; report {out / 'report.md'}, table {out / 'summary.json'}")
    return {"rows": rows, "paired": paired, "info": info, "table": table}


def _base_prompt(entry: dict, methods: list[dict], results: dict, seed: int) -> Path | None:
    """The head file of the method that ``entry`` post-hoc calibrates, when it already ran for ``seed``."""
    method = dict(entry["method"])
    name, sep, suffix = str(method.pop("name")).rpartition("+")
    if not sep:
        return None
    for other in methods:
        params = dict(other["method"])
        if params.pop("name") == name and params == method and seed in results.get(other["label"], {}):
            path = Path(results[other["label"]][seed]["dir"]) / "head.safetensors"
            return path if path.is_file() else None
    return None


def _known(cls, values: dict) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown pretrain setting(s) {unknown}; valid: {sorted(names)}")
    return values


def _weights_id(folder: Path) -> str:
    from calibprompt.backbones.open_clip_model import find_weights
    from calibprompt.settings import sha256_file

    weights = find_weights(Path(folder))
    return sha256_file(weights) if weights else str(folder)


def _reset_if_stale(out: Path, state: dict, runs_root: Path) -> None:
    """Finished runs are reused only for the same model weights, data and settings (a run's identity
    is its config, which names the model folder, not its weights)."""
    path = out / STATE_FILE
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
    if old != json.loads(json.dumps(state)) and runs_root.exists():
        shutil.rmtree(runs_root)
    atomic_write_json(path, state)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-").replace("--", "-")


def _label_of(methods: list[dict], name: str | None) -> str | None:
    if not name:
        return None
    for m in methods:
        if m["method"]["name"] == name or m["label"] == name:
            return m["label"]
    raise ValueError(f"reference method {name!r} is not among the demo methods")


def _meta_summary(meta: dict | None) -> dict | None:
    if not meta:
        return None
    keep = ("parameters", "settings", "seconds", "splits", "weights_sha256", "threads_chosen")
    out = {k: meta.get(k) for k in keep}
    out["sources"] = [{k: s.get(k) for k in ("name", "pretrain_images", "reserved_for_downstream", "val_images",
                                             "test_images_used", "captions_per_class")} for s in meta["sources"]]
    out["final"] = meta["history"][-1] if meta.get("history") else None
    return out


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------

def _values(results: dict[int, dict], key: str, seeds: list[int]) -> np.ndarray:
    return np.array([float(results[s]["result"]["metrics"][key]) for s in seeds])


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
            v = _values(results[label], key, seeds)
            row[f"{key}_mean"] = float(v.mean())
            row[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            row[f"{key}_per_seed"] = v.tolist()
        ref_ece = np.array([float(results[label][s]["result"]["metrics_reference"]["ece"]) for s in seeds])
        row["ece_reference_mean"] = float(ref_ece.mean())  # the official code's ECE convention (Q4)
        row["ece_reference_std"] = float(ref_ece.std(ddof=1)) if len(seeds) > 1 else 0.0
        row["confidence_mean"] = float(_values(results[label], "confidence", seeds).mean())
        temps = [((results[label][s]["result"].get("posthoc") or {}).get("params") or {}).get("temperature")
                 for s in seeds]
        if any(t is not None for t in temps):
            row["temperature_per_seed"] = temps
        rows.append(row)
    return rows


def _t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float]:
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
            d = _values(results[label], key, seeds) - _values(results[reference], key, seeds)
            lo, hi = _t_interval(d)
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


# ------------------------------------------------------------------------------------------------
# Output: table, CSV, figures, report
# ------------------------------------------------------------------------------------------------

def _cell(row: dict, key: str, percent: bool) -> str:
    m, s = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{m * 100:.1f} ± {s * 100:.1f}" if percent else f"{m:.3f} ± {s:.3f}"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    heads = ["Method"] + [f"{title} (%)" if pct else title for _, title, pct in METRICS]
    body = [[r["label"]] + [_cell(r, k, p) for k, _, p in METRICS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * len(METRICS)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [heads] + body) for i in range(len(heads))]
    first = rows[0] if rows else {}
    title = (f"{first.get('dataset', '')} {first.get('evaluated_on', 'test')} split ({first.get('n_test', '?')} images), "
             f"mean ± std over {first.get('n_seeds', '?')} seeds, backbone {first.get('backbone', '')}")
    sep = "  "
    lines = [title, sep.join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines.append("-" * len(lines[-1]))
    lines += [sep.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


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
    probs, labels = [], []
    for rec in results.values():
        with open(Path(rec["dir"]) / "predictions.csv", newline="") as handle:
            reader = csv.reader(handle)
            next(reader)
            for row in reader:
                labels.append(int(row[1]))
                probs.append([float(v) for v in row[3:]])
    return np.array(probs), np.array(labels)


def _bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10):
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    acc = np.full(n_bins, np.nan)
    mean_conf = np.full(n_bins, np.nan)
    count = np.bincount(idx, minlength=n_bins)
    for b in range(n_bins):
        if count[b]:
            acc[b] = correct[idx == b].mean()
            mean_conf[b] = conf[idx == b].mean()
    ece = float(np.nansum(count / len(conf) * np.abs(acc - mean_conf)))
    return acc, mean_conf, count, ece


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
        acc, mconf, count, ece = _bins(conf, correct)
        edges = np.linspace(0, 1, 11)
        shown = count > 0
        ax.bar(edges[:-1][shown], acc[shown], width=0.1, align="edge", color="#4c72b0", edgecolor="black",
               linewidth=0.5, label="accuracy")
        ax.bar(edges[:-1][shown], (mconf - acc)[shown], bottom=acc[shown], width=0.1, align="edge",
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
    atomic_write_text(path, "\n".join(lines))
