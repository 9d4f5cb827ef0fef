"""The functions that execute on a worker (in-process or as a Ray task): one sweep run, one tuning
trial. They take and return plain picklable data, so Ray can ship them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from calibprompt.experiments.executors import error_text
from calibprompt.features import FeatureCache

_CACHES: dict[str, FeatureCache] = {}


def shared_cache(root: str | None) -> FeatureCache:
    """One FeatureCache per root and process, so features stay in memory across a worker's tasks."""
    key = str(root) if root is not None else ""
    if key not in _CACHES:
        _CACHES[key] = FeatureCache(root)
    return _CACHES[key]


def _slot(payload: dict, cfg: dict) -> dict:
    """Apply the worker slot: torch threads, and device cuda when the task holds a GPU share."""
    threads = payload.get("threads")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if payload.get("gpu"):
        cfg = {**cfg, "device": "cuda"}  # device is not part of the run identity
    return cfg


def _run_files(folder: str | Path) -> dict[str, bytes]:
    """The files of a run folder, by name, for the driver to write (not the folder's lock files)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


def execute_runs(payload: dict) -> dict[str, Any]:
    """One or several sweep runs in one task (``payload["configs"]``, ``payload["run_dirs"]``): CoOp
    configurations that can train together do, with one text-encoder pass per step (``engine.run.run_many``).
    ``ship``: run in temporary folders and return the files' bytes (the driver writes them, ``metrics.json``
    last); else write straight into the run folders, which the sweep owns (anything else in them is stale).
    Returns ``{"runs": [...]}``, one entry per run: ``{"result": ...}`` (plus ``"files"`` when shipping) or
    ``{"error": text}``; one run's failure does not fail the others."""
    from calibprompt.engine.run import run_many

    cfgs = [_slot(payload, cfg) for cfg in payload["configs"]]
    cache = shared_cache(payload.get("cache_root"))
    with tempfile.TemporaryDirectory(prefix="calibprompt-runs-") as tmp:
        folders = [Path(tmp) / str(i) for i in range(len(cfgs))] if payload.get("ship") else payload["run_dirs"]
        results = run_many(cfgs, folders, cache=cache, overwrite=True, max_prompts=payload.get("max_prompts"))
        runs = []
        for folder, result in zip(folders, results):
            if isinstance(result, BaseException):
                runs.append({"error": error_text(result)})
            elif payload.get("ship"):
                runs.append({"result": result, "files": _run_files(folder)})
            else:
                runs.append({"result": result})
    return {"runs": runs}


def evaluate_trial(payload: dict) -> dict[str, Any]:
    """One tuning trial: validation metrics of each config (one per seed). Never sees the test split."""
    from calibprompt.engine.validation import validation_metrics

    cache = shared_cache(payload.get("cache_root"))
    out = []
    for cfg in payload["configs"]:
        cfg = _slot(payload, cfg)
        scored = validation_metrics(cfg, cache=cache)
        out.append({"seed": scored["seed"], "metrics": scored["metrics"], "n_val": scored["n_val"],
                    "n_train": scored["n_train"]})
    return {"per_seed": out}
