"""One run end to end: the pipeline's stages (``engine.pipeline``) plus the run folder
(``engine.artifacts``). A finished run is reused when the resolved config's hash matches."""

from __future__ import annotations

import time
from pathlib import Path

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

    seed = int(resolved["seed"])
    torch.manual_seed(seed)
    device = pipeline.resolve_device(resolved["device"])
    dataset, split = pipeline.open_split(resolved)
    split.to_json(out_dir / "split.json")
    train_s, val_s, test_s = (split.samples_for(part) for part in ("train", "val", "test"))
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    backbone = pipeline.loaded_backbone(resolved["backbone"], device)
    timings["load_backbone"] = time.perf_counter() - t
    cache = cache or FeatureCache(resolved.get("cache_dir"), **resolved["encode"])
    method = pipeline.build_method(resolved)
    encoded_before = cache.encoded

    t = time.perf_counter()
    fits = head_from is None and (method.trains or method.train_views != "none")
    feats = pipeline.encode(cache, backbone, dataset, method, resolved, [test_s, val_s], train_s, fits, not quiet)
    test_feats, val_feats = feats.evals
    timings["features"] = time.perf_counter() - t

    fitted = pipeline.fit(method, backbone, dataset, resolved, train_s, feats.train_views,
                          (val_feats, val_s) if val_s else None, device, progress=not quiet, head_from=head_from)
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
    timings["total"] = time.perf_counter() - t0
    flags = run_flags(fitted.info, posthoc_info, metrics, test_labels, method.trains and head_from is None)
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
        "images_encoded": cache.encoded - encoded_before,
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
