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
import json
import shutil
import time
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from calibprompt.demo.config import load_demo_config, parse_seeds, resolve_dataset, write_splits
from calibprompt.demo.report import (draw_figures, format_conformal, format_paired, format_table, summarise,
                                     write_per_seed, write_report)
from calibprompt.progress import log
from calibprompt.reporting.stats import paired_differences
from calibprompt.settings import atomic_write_json, cache_dir, slug

STATE_FILE = "demo_state.json"
RUN_THREADS = 1  # torch threads during the prompt-tuning runs


class Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            log.info("[%s] %s", self.elapsed(), msg)

    def elapsed(self) -> str:
        s = int(time.perf_counter() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def run_demo(out: str | Path, dataset: str | None = None, seeds: Any = None, config: str | Path | None = None,
             model: str | Path | None = None, quiet: bool = False, retrain: bool = False,
             pretrain_overrides: dict | None = None, eval_on: str | None = None) -> dict:
    """Run the demo into ``out`` and return ``{"rows": summary rows, "paired": ..., ...}``."""
    import torch

    t_start = time.perf_counter()
    say = Progress(quiet)
    cfg = load_demo_config(config)
    seed_list = parse_seeds(seeds if seeds is not None else cfg["seeds"])
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data_cfg, ds, is_flag = _data(str(dataset or cfg["dataset"]), quiet, say)
    timings["data"] = time.perf_counter() - t_start
    t = time.perf_counter()
    model_dir, meta, trained = _model(cfg, ds, data_cfg, is_flag, model, retrain, pretrain_overrides, quiet, say)
    timings["model"] = time.perf_counter() - t
    t = time.perf_counter()
    eval_on = eval_on or cfg.get("eval_on") or "test"
    results, notes = _runs(cfg, out, ds, data_cfg, model_dir, seed_list, eval_on, say)
    timings["runs"] = time.perf_counter() - t
    t = time.perf_counter()
    say("4/4 summary and report")
    methods = cfg["methods"]
    rows = summarise(methods, results, ds.name, seed_list, eval_on)
    reference = _label_of(methods, cfg.get("reference"))
    paired = paired_differences(methods, results, reference, seed_list)
    write_per_seed(out / "per_seed.csv", methods, results, seed_list)
    figures = draw_figures(out, methods, results, ds, reference, paired, eval_on)
    atomic_write_json(out / "summary.json", rows)
    atomic_write_json(out / "paired.json", paired)
    timings["report_figures"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    run_cfg = cfg["run"] or {}
    info = {
        "dataset": ds.name, "data": data_cfg, "seeds": seed_list, "model_dir": str(model_dir),
        "model_trained_now": trained, "model_meta": _meta_summary(meta), "timings": timings,
        "counts": ds.counts(), "shots": int(run_cfg.get("shots", 8)), "val_shots": int(run_cfg.get("val_shots", 0)),
        "run": run_cfg, "eval_on": eval_on, "torch_threads": torch.get_num_threads(), "notes": notes,
    }
    atomic_write_json(out / "demo.json", info)
    write_report(out / "report.md", rows, paired, info, figures, methods, results, reference)
    table = format_table(rows)
    conformal = format_conformal(rows, reference)
    text = table + "\n" + format_paired(paired, reference) + (("\n\n" + conformal) if conformal else "")
    say(f"done in {timings['total'] / 60:.1f} min; report {out / 'report.md'}, table {out / 'summary.json'}")
    return {"rows": rows, "paired": paired, "info": info, "table": table, "text": text}


def _data(spec: str, quiet: bool, say) -> tuple[dict, Any, bool]:
    """Stage 1: the ``data:`` section, the opened dataset, and whether it is a MedMNIST flag."""
    from calibprompt.data import open_dataset

    say(f"1/4 data: {spec}")
    data_cfg, is_flag = resolve_dataset(spec, quiet)
    ds = open_dataset(data_cfg)
    counts = ds.counts()
    say(f"    {ds.name}: {len(ds.classnames)} classes {ds.classnames}; images per split "
        + ", ".join(f"{k or 'all'} {sum(v)}" for k, v in counts.items()))
    return data_cfg, ds, is_flag


def _model(cfg: dict, ds, data_cfg: dict, is_flag: bool, model, retrain: bool, overrides: dict | None,
           quiet: bool, say) -> tuple[Path, dict | None, bool]:
    """Stage 2: the backbone folder: ``--model`` as given, else the micro model (pretrained when missing)."""
    from calibprompt.pretrain import DEFAULT_SOURCES, PretrainSettings, ensure_model, medmnist_data_cfg, read_meta
    from calibprompt.pretrain import model_dir as default_dir

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
        settings = PretrainSettings(**_known(PretrainSettings, {**(cfg.get("pretrain") or {}), **(overrides or {})}))
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
    return model_dir, meta, trained


def _runs(cfg: dict, out: Path, ds, data_cfg: dict, model_dir: Path, seeds: list[int], eval_on: str,
          say) -> tuple[dict, list[str]]:
    """Stage 3: every method on every seed's split, through the run pipeline, one shared feature cache."""
    import torch

    from calibprompt.config import load_config
    from calibprompt.engine.run import run
    from calibprompt.features import FeatureCache

    run_cfg = cfg["run"] or {}
    shots, val_shots = int(run_cfg.get("shots", 8)), int(run_cfg.get("val_shots", 0))
    runs_root = out / "runs"
    _reset_if_stale(out, {"weights": _weights_id(model_dir), "dataset": ds.fingerprint(), "run": run_cfg,
                          "shots": shots, "val_shots": val_shots, "eval_on": eval_on}, runs_root)
    split_files = write_splits(ds, seeds, shots, val_shots, out / "splits", eval_on=eval_on)
    cache = FeatureCache(cache_dir() / "features")
    methods = cfg["methods"]
    total = len(seeds) * len(methods)
    say(f"3/4 runs: {len(methods)} methods x {len(seeds)} seeds = {total} runs "
        f"({shots} shots/class, {val_shots} val shots/class; evaluated on the {eval_on} split)")
    results: dict[str, dict[int, dict]] = {m["label"]: {} for m in methods}
    notes: list[str] = []  # distinct warnings raised by the runs (shown once, and in the report)
    # Runs are small ops on a few prompts per step: one thread is as fast as two on an idle machine and
    # several times faster on a busy one (no thread barrier per small op).
    threads = torch.get_num_threads()
    torch.set_num_threads(RUN_THREADS)
    try:
        for seed in seeds:
            for entry in methods:
                base = copy.deepcopy(run_cfg)
                base.update({"seed": seed, "split_file": str(split_files[seed]), "backbone": {"path": str(model_dir)},
                             "data": data_cfg, "method": copy.deepcopy(entry["method"]),
                             "name": f"{entry['label']} · {ds.name} · seed {seed}"})
                folder = runs_root / slug(entry["label"]) / f"seed{seed}"
                # "<method>+ts" evaluates the head its base method fitted on the same seed (same split, same
                # settings) with a temperature fitted on the validation shots: no second training.
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = run(load_config(None, base=base), folder, quiet=True, cache=cache, overwrite=True,
                                 head_from=_base_prompt(entry, methods, results, seed))
                for w in caught:
                    text = f"{entry['label']}: {w.message}"
                    if text not in notes:
                        notes.append(text)
                        say(f"    note: {text}")
                results[entry["label"]][seed] = {"dir": folder, "result": result}
                m = result["metrics"]
                say(f"    [{sum(map(len, results.values())):2d}/{total}] seed {seed} {entry['label']:<18} accuracy "
                    f"{m['accuracy'] * 100:5.1f}%  ECE {m['ece'] * 100:5.2f}%  NLL {m['nll']:.3f}")
    finally:
        torch.set_num_threads(threads)
    return results, notes


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
