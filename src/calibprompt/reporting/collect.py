"""Collecting a sweep's results: one group per (shots, backbone, dataset, method, variant), with the
metrics of every finished seed, read from the results store and each run's files."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
import numpy as np

from calibprompt.experiments.store import ResultStore

@dataclass
class Group:
    """The runs of one table cell group: (shots, backbone, dataset, method row)."""

    shots: int
    backbone: str
    dataset: str
    method: str
    variant: str
    planned: int = 0
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    run_dirs: list[Path] = field(default_factory=list)
    n_bins: int = 10
    failed: int = 0
    flags: list[str] = field(default_factory=list)  # "seed N: message" of runs that look meaningless
    intervals: list[dict] = field(default_factory=list)  # per run: seed and test-bootstrap intervals

    @property
    def row(self) -> str:
        return f"{self.method} [{self.variant}]" if self.variant else self.method

    @property
    def n(self) -> int:
        return len(self.seeds)

    def stat(self, metric: str) -> tuple[float, float | None, int] | None:
        vals = [v for v in self.values.get(metric, []) if v is not None and not math.isnan(v)]
        if not vals:
            return None
        return mean(vals), (stdev(vals) if len(vals) > 1 else None), len(vals)


@dataclass
class Collection:
    sweep: dict
    groups: list[Group]
    failed: list[dict]
    counts: dict[str, int]
    convention: str


# ------------------------------------------------------------------------------------------- collect
def collect(out_dir: str | Path, store_url: str | None = None, convention: str = "standard") -> Collection:
    """Group the done runs of the sweep in ``out_dir`` (only those the current grid plans)."""
    from calibprompt.experiments.sweep import read_sweep_file

    out_dir = Path(out_dir)
    sweep = read_sweep_file(out_dir)
    if sweep is None:
        raise FileNotFoundError(f"{out_dir} holds no sweep.json; run `calibprompt sweep GRID --out {out_dir}` first")
    if convention not in ("standard", "reference"):
        raise ValueError(f"convention must be 'standard' or 'reference', got {convention!r}")
    url = store_url or _stored_url(sweep, out_dir)
    store = ResultStore.for_dir(out_dir, url)
    try:
        planned = sweep["runs"]
        rows = {r["config_hash"]: r for r in store.rows(sweep["sweep_id"], [p["config_hash"] for p in planned])}
    finally:
        store.close()
    key_of = "metrics" if convention == "standard" else "metrics_reference"
    groups: dict[tuple, Group] = {}
    failed = []
    counts = {"planned": len(planned), "done": 0, "failed": 0, "pending": 0, "running": 0}
    for plan in planned:
        vkey = _variant_key(plan.get("variant") or {})
        key = (plan["shots"], plan["backbone"], plan["dataset"], plan["method"], vkey)
        group = groups.setdefault(key, Group(*key))
        group.planned += 1
        row = rows.get(plan["config_hash"])
        status = row["status"] if row else "pending"
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            group.failed += 1
            failed.append({"run_id": plan["run_id"], "title": f"{group.row} · {plan['backbone']} · {plan['dataset']} · "
                           f"{plan['shots']} shots · seed {plan['seed']}", "error": (row.get("error") or "").strip()})
        if status != "done":
            continue
        metrics = row.get(key_of) or {}
        group.seeds.append(plan["seed"])
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                group.values.setdefault(name, []).append(float(value))
        local = out_dir / "runs" / plan["run_id"]
        group.run_dirs.append(local if local.is_dir() else Path(row.get("run_dir") or local))
        record = _run_record(group.run_dirs[-1])
        group.flags += [f"seed {plan['seed']}: {f['message']}" for f in record.get("flags") or []]
        if record.get("intervals"):
            group.intervals.append({"seed": plan["seed"], **record["intervals"]})
        group.n_bins = int(((row.get("config") or {}).get("eval") or {}).get("n_bins", 10))
    return Collection(sweep, list(groups.values()), failed, counts, convention)


def _stored_url(sweep: dict, out_dir: Path) -> str | None:
    from calibprompt.experiments.store import STORE_ENV, default_url

    url = sweep.get("store")
    if sweep.get("store_default") or not url:
        return default_url(out_dir)  # DIR/results.sqlite, wherever DIR is now
    if "***" in url:
        if os.environ.get(STORE_ENV):
            return os.environ[STORE_ENV]
        raise ValueError(f"the sweep in {out_dir} used the store {url}; give its password with --store URL "
                         f"(or ${STORE_ENV})")
    return url


def _variant_key(variant: dict) -> str:
    from calibprompt.experiments.grid import variant_key

    return variant_key(variant)


# ------------------------------------------------------------------------------------------- tables


def read_predictions(path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(probabilities (N, K), labels (N,)) of a run's predictions.csv (its ``prob_*`` and ``label`` columns),
    or (None, None) when the file is absent or empty."""
    if not path.is_file():
        return None, None
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header or "label" not in header:
            return None, None
        li = header.index("label")
        pi = [i for i, h in enumerate(header) if h.startswith("prob_")]
        rows = [(int(r[li]), [float(r[i]) for i in pi]) for r in reader if r]
    if not rows:
        return None, None
    probs = np.array([r[1] for r in rows], dtype=np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # undo the 8-digit rounding of the CSV
    return probs, np.array([r[0] for r in rows])


def _run_record(run_dir: Path) -> dict:
    """A run's metrics.json (flags, bootstrap intervals); empty when the file is not here."""
    import json

    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
