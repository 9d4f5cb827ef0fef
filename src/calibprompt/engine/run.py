"""One run end to end: the pipeline's stages (``engine.pipeline``) plus the run folder
(``engine.artifacts``). A finished run is reused when the resolved config's hash matches."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from calibprompt.config import config_hash, dump, resolve
from calibprompt.engine import pipeline
from calibprompt.engine.checks import run_flags
from calibprompt.engine.artifacts import (
    RESULT_FILE,
    RunConflict,
    backbone_record,
    finished_result,
    versions,
    write_predictions,
)
from calibprompt.features import FeatureCache
from calibprompt.methods.heads import head_bytes
from calibprompt.progress import folder_lock, folder_log, log, note
from calibprompt.settings import atomic_write_bytes, atomic_write_json, atomic_write_text


def run(cfg: dict, out_dir: str | Path, *, quiet: bool = False, cache: FeatureCache | None = None,
        overwrite: bool = False, head_from: str | Path | None = None) -> dict:
    """Execute (or reuse) the run described by ``cfg`` and write its files to ``out_dir``.

    ``head_from``: evaluate a saved head (``head.safetensors``) or saved context vectors
    (``prompt.safetensors``) instead of fitting (``calibprompt eval``). The folder is locked while the run
    works in it: a second process aiming at the same folder fails at once naming the holder."""
    resolved = resolve(cfg)  # every key checked before any folder, data or model is touched
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file, not a folder; choose a folder path")
    with folder_lock(out_dir, ".run.lock"), folder_log(out_dir):
        log.debug("run %s: config %s", out_dir, {k: resolved[k] for k in ("seed", "shots", "resolved_method")})
        return _run(resolved, out_dir, quiet=quiet, cache=cache, overwrite=overwrite, head_from=head_from)


def _run(resolved: dict, out_dir: Path, *, quiet: bool, cache: FeatureCache | None, overwrite: bool,
         head_from: str | Path | None) -> dict:
    state = _prepare(resolved, out_dir, quiet=quiet, cache=cache, overwrite=overwrite, head_from=head_from)
    if isinstance(state, dict):  # a finished run of this config, reused
        return state
    return _finish(state, state.fit())


@dataclass
class _Run:
    """A run between its stages: everything up to the fit (data, backbone, features), then the rest."""

    resolved: dict
    out_dir: Path
    run_hash: str
    head_from: str | Path | None
    quiet: bool
    cache: FeatureCache
    prepared: float  # seconds this run spent up to its fit (its total adds its own fit and finish)
    timings: dict
    dataset: Any
    parts: tuple  # (train, val, test) samples
    device: Any
    backbone: Any
    method: Any
    encoded: int  # images this run encoded (its own, even when other runs prepare beside it)
    feats: Any

    def fit_context(self):
        train_s, val_s, _ = self.parts
        val = (self.feats.evals[1], val_s) if val_s else None
        return pipeline.fit_context(self.backbone, self.dataset, self.resolved, train_s, self.feats.train_views, val,
                                    self.device, progress=not self.quiet)

    def fit(self, ctx=None):
        """Fit (or restore) this run's method; ``ctx``: its :meth:`fit_context`, when already built."""
        return pipeline.fit_method(self.method, ctx if ctx is not None else self.fit_context(), self.head_from)


def _prepare(resolved: dict, out_dir: Path, *, quiet: bool, cache: FeatureCache | None, overwrite: bool,
             head_from: str | Path | None) -> _Run | dict:
    head_from = head_from if head_from is not None else resolved.get("head_from")
    if head_from is not None:
        from calibprompt.settings import sha256_file

        resolved["resolved_method"]["trains"] = False
        resolved["head_from"] = str(head_from)
        if Path(head_from).is_file():  # a new file at the same path is another run
            resolved["head_from_sha256"] = sha256_file(head_from)
    run_hash = config_hash(resolved)
    done = finished_result(out_dir, run_hash)
    if done is not None:
        changed = changed_inputs(done, resolved)
        if not changed:
            log.info("reusing finished run %s in %s", run_hash[:12], out_dir)
            return done
        note(f"{out_dir}: the finished run of this config used other inputs ({changed}); running it again")
        overwrite = True
    other = finished_result(out_dir)
    if other is not None and not overwrite:
        raise RunConflict(
            f"{out_dir} holds a finished run of another configuration (hash {other.get('config_hash', '?')[:12]}, "
            f"this one {run_hash[:12]}); choose another --out or pass --overwrite"
        )
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # an interrupted rerun must never look finished
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump(resolved))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    torch.manual_seed(int(resolved["seed"]))
    device = pipeline.resolve_device(resolved["device"])
    dataset, split = pipeline.open_split(resolved)
    split.to_json(out_dir / "split.json")
    train_s, val_s, test_s = (split.samples_for(part) for part in ("train", "val", "test"))
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    backbone = pipeline.loaded_backbone(resolved["backbone"], device)
    timings["load_backbone"] = time.perf_counter() - t
    cache = pipeline.feature_cache(cache, resolved)
    method = pipeline.build_method(resolved)
    encoded_before = cache.encoded

    t = time.perf_counter()
    fits = head_from is None and (method.trains or method.train_views != "none")
    feats = pipeline.encode(cache, backbone, dataset, method, resolved, [test_s, val_s], train_s, fits, not quiet)
    timings["features"] = time.perf_counter() - t
    return _Run(resolved, out_dir, run_hash, head_from, quiet, cache, time.perf_counter() - t0, timings, dataset,
                (train_s, val_s, test_s),
                device, backbone, method, cache.encoded - encoded_before, feats)


def _finish(state: _Run, fitted) -> dict:
    t_finish = time.perf_counter()
    resolved, out_dir, run_hash, timings = state.resolved, state.out_dir, state.run_hash, state.timings
    dataset, backbone, method, device = state.dataset, state.backbone, state.method, state.device
    train_s, val_s, test_s = state.parts
    test_feats, val_feats = state.feats.evals
    seed = int(resolved["seed"])
    if "seconds" in fitted.info:
        timings["train"] = fitted.info.pop("seconds")
    head = fitted.head.to(device)
    atomic_write_bytes(out_dir / "head.safetensors",
                       head_bytes(head, {"config_hash": run_hash, "method": method.name,
                                         "classnames": list(dataset.classnames), "template": dataset.template,
                                         "backbone_fingerprint": backbone.fingerprint()}))
    for name, data in fitted.files.items():
        atomic_write_bytes(out_dir / name, data)

    t = time.perf_counter()
    calibrator, posthoc_info = pipeline.fit_posthoc(resolved["resolved_method"]["posthoc"], head, val_feats, val_s)
    test_logits = pipeline.logits(head, test_feats, calibrator, int(resolved["eval"]["batch_size"]))
    test_labels = np.array([s.label for s in test_s])
    metrics, metrics_ref = _evaluate(test_logits, test_labels, out_dir, resolved)
    intervals = _intervals(test_logits, test_labels, resolved, seed, metrics)
    conformal, selective = pipeline.fit_decisions(resolved, head, calibrator, val_feats, val_s, dataset,
                                                  int(resolved["eval"]["batch_size"]))
    test_probs = torch.softmax(test_logits.double(), dim=1).numpy()
    sets, abstain = pipeline.decide(test_probs, conformal, selective, dataset, test_s)
    decisions = _decision_metrics(test_probs, test_labels, conformal, selective, sets, abstain, metrics)
    timings["evaluate"] = time.perf_counter() - t
    timings["total"] = state.prepared + timings.get("train", 0.0) + time.perf_counter() - t_finish
    flags = run_flags(fitted.info, posthoc_info, metrics, test_labels, method.trains and state.head_from is None)
    for flag in flags:
        note(f"run {resolved.get('name') or out_dir}: {flag['message']}")
    write_predictions(out_dir / "predictions.csv", test_s, test_logits, list(dataset.classnames), sets, abstain)

    result = {
        "status": "done",
        "config_hash": run_hash,
        "run_id": run_hash[:16],
        "name": resolved.get("name"),
        "method": resolved["resolved_method"]["name"],
        "method_kind": method.name,
        "backbone": backbone.info.name,
        "dataset": dataset.name,
        "shots": int(resolved["shots"]),
        "seed": seed,
        "metrics": metrics,
        "metrics_reference": metrics_ref,
        "intervals": intervals,
        "posthoc": posthoc_info,
        "conformal": decisions.get("conformal"),
        "selective": decisions.get("selective"),
        "flags": flags,
        "train": fitted.info,
        "n_test": len(test_s),
        "n_val": len(val_s),
        "images_encoded": state.encoded,
        "timings": timings,
        "versions": versions(device),
        "backbone_info": backbone_record(backbone),
        "inputs": {"weights_files": pipeline._file_stamps(resolved["backbone"]), "data": dataset.fingerprint()},
        "config": resolved,
    }
    atomic_write_json(out_dir / RESULT_FILE, result)  # last: its presence marks the run finished
    from calibprompt.engine.tracking import mirror_run

    mirror_run(result, out_dir, resolved.get("tracking"))  # a copy for TensorBoard / MLflow when configured
    return result


def run_many(cfgs: Sequence[dict], out_dirs: Sequence[str | Path], *, cache: FeatureCache | None = None,
             overwrite: bool = False, batch: bool = True, max_prompts: int | None = None) -> list:
    """Several runs (quiet), each exactly as :func:`run` would make it, except that CoOp configurations that
    can train together (equal :meth:`CoOp.batch_key`: one backbone, class list, prompt layout and step
    count; seeds, losses, learning rates may differ) do, with one text-encoder pass per step
    (:func:`calibprompt.methods.coop.fit_together`; metrics equal to separate runs within 1e-4). ``batch=False``
    fits each alone. Returns one result dict, or the exception that stopped that run, per config, in
    order: one run's failure does not stop the others."""
    out: list = [None] * len(cfgs)
    states: dict[int, _Run] = {}
    with contextlib.ExitStack() as stack:
        for i, (cfg, folder) in enumerate(zip(cfgs, out_dirs)):
            try:
                resolved, folder = resolve(cfg), Path(folder)
                stack.enter_context(folder_lock(folder, ".run.lock"))
                with folder_log(folder):
                    state = _prepare(resolved, folder, quiet=True, cache=cache, overwrite=overwrite, head_from=None)
                if isinstance(state, dict):
                    out[i] = state
                else:
                    states[i] = state
            except Exception as err:  # noqa: BLE001 - reported as that run's failure
                out[i] = err
        with contextlib.ExitStack() as logs:  # what the joint fit says reaches every run's log.txt
            for state in states.values():
                logs.enter_context(folder_log(state.out_dir))
            fitted = _fit_states(states, batch, max_prompts)
        for i, state in states.items():
            try:
                if isinstance(fitted[i], Exception):
                    raise fitted[i]
                with folder_log(state.out_dir):
                    out[i] = _finish(state, fitted[i])
            except Exception as err:  # noqa: BLE001
                out[i] = err
    return out


def _fit_states(states: dict[int, _Run], batch: bool, max_prompts: int | None) -> dict:
    """Fit every prepared run: groups of one batch key together, the others alone. A group whose joint
    training fails is fitted again one by one (with a note), so batching never costs a result."""
    from calibprompt.methods.coop import fit_together

    groups: dict = {}
    contexts = {}
    fitted: dict = {}
    for i, state in states.items():
        key = None
        try:
            if batch and state.head_from is None and hasattr(state.method, "batch_key"):
                contexts[i] = state.fit_context()
                key = state.method.batch_key(contexts[i])
        except Exception as err:  # noqa: BLE001 - that run's failure, not the unit's
            fitted[i] = err
            continue
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    for key, members in groups.items():
        if len(members) > 1:
            try:
                results = fit_together([states[i].method for i in members], [contexts[i] for i in members],
                                       max_prompts=max_prompts)
                fitted.update(zip(members, results))
                log.info("trained %d configurations together (one text-encoder pass per step)", len(members))
                continue
            except Exception as err:  # noqa: BLE001 - fall back to separate fits
                note(f"batched training of {len(members)} configurations failed ({type(err).__name__}: {err}); "
                     "fitting them one by one")
        for i in members:
            try:
                fitted[i] = states[i].fit(contexts.get(i))
            except Exception as err:  # noqa: BLE001
                fitted[i] = err
    return fitted


def changed_inputs(done: dict, resolved: dict) -> str:
    """What differs between the inputs a finished run recorded and the files there now: the backbone's
    weight files (name, size, modification time) and the data (content fingerprint). The run identity
    hashes the config, which names paths; this catches new files at the same paths. "" if nothing."""
    recorded = done.get("inputs")
    if not recorded:
        return "no input fingerprints recorded (a result from an older calibprompt)"
    changes = []
    if [list(x) for x in pipeline._file_stamps(resolved["backbone"])] != [list(x) for x in recorded["weights_files"]]:
        changes.append(f"weight files under {resolved['backbone'].get('path')} changed")
    from calibprompt.data import open_dataset

    if open_dataset(resolved["data"]).fingerprint() != recorded["data"]:
        changes.append("images or labels of the dataset changed")
    return "; ".join(changes)


def _decision_metrics(probs: np.ndarray, labels: np.ndarray, conformal, selective, sets, abstain,
                      metrics: dict) -> dict:
    """Adds selective-prediction metrics (AURC, E-AURC, ...) and, when fitted, the conformal (``cp_*``) and
    abstention (``sel_*``) metrics of the test sets and abstentions to ``metrics``; returns the fitted states
    with details."""
    from calibprompt.metrics.conformal import conformal_metrics
    from calibprompt.metrics.selective import selective_metrics, selective_outcome

    metrics.update(selective_metrics(probs, labels, inputs="probs"))
    out: dict = {}
    if sets is not None:
        cm = conformal_metrics(sets, labels, conformal.alpha)
        details = cm.pop("details")
        metrics.update(cm)
        out["conformal"] = {**conformal.state(), **details}
    if abstain is not None:
        metrics.update(selective_outcome(probs, labels, abstain))
        out["selective"] = selective.state()
    return out


def _intervals(logits: torch.Tensor, labels: np.ndarray, resolved: dict, seed: int, metrics: dict) -> dict | None:
    """95% percentile-bootstrap intervals of the test ECE and accuracy (``eval.bootstrap`` resamples of the
    test images, generator seeded by the run's seed) around ``metrics`` (the run's standard-convention
    values); None when ``eval.bootstrap`` is 0."""
    from calibprompt.metrics import bootstrap_ci

    n = int(resolved["eval"].get("bootstrap", 0))
    if n < 1 or len(labels) < 2:
        return None
    ci = bootstrap_ci(["ece", "accuracy"], logits.double().numpy(), labels, n_resamples=n, seed=seed,
                      n_bins=int(resolved["eval"]["n_bins"]))
    return {"level": 0.95, "method": "percentile", "n_resamples": n, "convention": "standard",
            "point": {k: float(metrics[k]) for k in ci}, **{k: list(v) for k, v in ci.items()}}


def _evaluate(logits: torch.Tensor, labels: np.ndarray, out_dir: Path, resolved: dict) -> tuple[dict, dict]:
    from calibprompt.metrics import calibration_metrics, reliability_diagram

    n_bins = int(resolved["eval"]["n_bins"])
    logits_np = logits.double().numpy()
    standard = calibration_metrics(logits_np, labels, n_bins=n_bins, convention="standard")
    reference = calibration_metrics(logits_np, labels, n_bins=n_bins, convention="reference")
    title = f"{resolved['resolved_method']['name']} · {resolved.get('name') or ''}".strip(" ·")
    reliability_diagram(logits_np, labels, out_dir / "reliability.png", n_bins=n_bins, title=title)
    return standard, reference
