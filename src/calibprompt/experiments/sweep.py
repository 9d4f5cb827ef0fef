"""``calibprompt sweep``: expand a grid, skip what is finished, run the rest on an executor, and record
every run in the results store.

Layout of a sweep folder ``DIR``::

    sweep.json            sweep id, grid, store URL (password masked), the planned runs in grid order
    results.sqlite        the results store (unless --store / $CALIBPROMPT_STORE names another database)
    runs/<run_id>/        one folder per run (run_id = first 16 hex of the config hash), as `train` writes
    report/               written by `calibprompt report DIR`

Resume rule: a run is skipped only when its ``runs/<run_id>/metrics.json`` says ``done`` with the same
config hash. A row left ``running`` by a crash, a ``failed`` row (unless --no-retry-failed) and a
``done`` row whose metrics.json is missing or different are run again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from calibprompt.experiments.executors import check_jobs, make_executor
from calibprompt.experiments.grid import Grid, RunSpec
from calibprompt.experiments.store import ResultStore, default_url, public_url
from calibprompt.experiments.tasks import execute_runs
from calibprompt.features import FeatureCache
from calibprompt.progress import FolderBusy, folder_lock, folder_log  # noqa: F401 - FolderBusy re-exported
from calibprompt.config import DEFAULTS
from calibprompt.engine.artifacts import RESULT_FILE, finished_result
from calibprompt.engine.tracking import enabled, end_sweep, mirror_run, start_sweep
from calibprompt.settings import atomic_write_bytes, atomic_write_json

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "calibprompt.sweep/1"
BATCH_RUNS = 16  # most runs one task trains together (C x K prompts per text-encoder pass)


@dataclass
class SweepSummary:
    out_dir: str
    sweep_id: str
    store: str
    planned: int = 0
    skipped: int = 0  # finished before this invocation
    recovered: int = 0  # metrics.json finished but the store did not say so yet (crash in between)
    executed: int = 0
    done: int = 0  # done now, all together
    failed: int = 0
    left_failed: int = 0  # failed earlier and not retried (--no-retry-failed)
    duplicates: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    flagged: list[dict] = field(default_factory=list)  # runs done now whose results look meaningless

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def feature_cache_root(grid: Grid, cache_dir: str | None = None) -> str:
    """The feature cache every worker uses: --cache-dir, else the grid's cache_dir, else the default
    ($CALIBPROMPT_CACHE/features); absolute, so remote workers on a shared file system find it."""
    from calibprompt.experiments.grid import _absolute_paths

    root = _absolute_paths({"cache_dir": cache_dir or grid.base.get("cache_dir")})["cache_dir"]
    return str(Path(root or FeatureCache(None).root).absolute())


def read_sweep_file(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path} is not a calibprompt sweep file (format {data.get('format')!r})")
    return data


def run_sweep(grid: Grid, out_dir: str | Path, *, store_url: str | None = None, executor: str = "local",
              ray_address: str | None = None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
              max_in_flight: int | None = None, cache_dir: str | None = None, retry_failed: bool = True, jobs: int = 1,
              log: Callable[[str], None] | None = print, batch: int = BATCH_RUNS) -> SweepSummary:
    """Run every unfinished run of ``grid`` into ``out_dir`` (see module docstring). ``batch``: most
    prompt-learning runs of one backbone, data and prompt layout trained together (1: each alone)."""
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    check_jobs(jobs, executor)
    specs = grid.expand()  # every config is validated before anything runs
    with folder_lock(out_dir, ".sweep.lock"), folder_log(out_dir):
        previous = read_sweep_file(out_dir) or {}
        store = ResultStore.for_dir(out_dir, store_url)
        # One sweep (and so one row per run) per output folder, even when sweep.json was deleted.
        sweep_id = previous.get("sweep_id") or store.sweep_for_dir(out_dir) or uuid.uuid4().hex
        summary = SweepSummary(str(out_dir), sweep_id, public_url(store.url), planned=len(specs),
                               duplicates=grid.duplicates)
        try:
            store.ensure_sweep(sweep_id, grid.name, str(out_dir), grid.spec)
            cache_root = feature_cache_root(grid, cache_dir)
            todo: list[tuple[RunSpec, Path]] = []
            for position, spec in enumerate(specs):
                run_dir = out_dir / "runs" / spec.run_id
                row = store.plan(sweep_id, spec, position, str(run_dir))
                finished = finished_result(run_dir, spec.config_hash)
                if finished is not None:
                    if row["status"] == "done":
                        summary.skipped += 1
                    else:
                        store.mark_done(sweep_id, spec.config_hash, finished)
                        summary.recovered += 1
                    continue
                if row["status"] == "failed" and not retry_failed:
                    summary.left_failed += 1
                    continue
                if row["status"] != "pending":
                    store.mark_pending(sweep_id, spec.config_hash)
                todo.append((spec, run_dir))
            _write_sweep_file(out_dir, sweep_id, grid, specs, store.url, previous)
            log(f"sweep {grid.name}: {len(specs)} runs planned, {summary.skipped + summary.recovered} already "
                f"done, {len(todo)} to run ({executor}) -> {out_dir}")
            tracking = specs[0].config.get("tracking") if specs and todo else None
            parent = start_sweep(tracking, grid.name, sweep_id, {"grid": grid.source, "runs": len(specs),
                                                                 "out": str(out_dir)})
            mirror = (lambda result, run_dir: mirror_run(result, run_dir, tracking, parent)) \
                if enabled(tracking) else None
            counts = None
            try:
                if todo:
                    _execute(todo, store, sweep_id, summary, cache_root, log, executor, ray_address, cpus_per_run,
                             gpus_per_run, max_in_flight, jobs, mirror, batch)
                counts = store.counts(sweep_id, [s.config_hash for s in specs])
                summary.done, summary.failed = counts["done"], counts["failed"]
            finally:
                end_sweep(tracking, parent, counts)  # KILLED when the sweep stopped early
        finally:
            store.close()
    summary.seconds = time.perf_counter() - start
    log(f"sweep {grid.name}: {summary.done}/{summary.planned} done, {summary.failed} failed, "
        f"{summary.executed} executed now in {summary.seconds:.1f} s; store {summary.store}"
        + (f"; {len(summary.flagged)} flagged (see the report's list)" if summary.flagged else ""))
    return summary


def plan_units(todo: list, batch: int) -> list[list]:
    """``todo`` as tasks: runs of one ``RunSpec.batch_group`` in units of at most ``batch``, every other run
    alone; first-appearance order. The units do not depend on the executor or its workers, so a sweep gives
    the same numbers bit for bit locally, with ``--jobs`` and on Ray (fewer, larger tasks: pass
    ``--no-batch`` where many workers would otherwise idle)."""
    if batch <= 1:
        return [[item] for item in todo]
    groups: dict = {}
    for n, item in enumerate(todo):
        key = item[0].batch_group
        groups.setdefault(key if key is not None else ("alone", n), []).append(item)
    units = []
    for members in groups.values():  # near-equal units: 20 runs at most 16 per unit are 10 + 10, not 16 + 4
        parts = -(-len(members) // batch)
        size, extra = divmod(len(members), parts)
        start = 0
        for p in range(parts):
            end = start + size + (p < extra)
            units.append(members[start:end])
            start = end
    return units


def _execute(todo, store: ResultStore, sweep_id: str, summary: SweepSummary, cache_root: str, log,
             executor: str, ray_address, cpus_per_run, gpus_per_run, max_in_flight, jobs: int = 1,
             mirror: Callable[[dict, Path], Any] | None = None, batch: int = BATCH_RUNS) -> None:
    ex = make_executor(executor, ray_address=ray_address, cpus_per_run=cpus_per_run,
                       gpus_per_run=gpus_per_run, max_in_flight=max_in_flight, jobs=jobs)
    ship = ex.name == "ray"  # remote workers return the files; only this process writes DIR
    queue = deque(plan_units(todo, batch))
    total = len(todo)
    try:
        while queue or ex.pending():
            while queue and ex.pending() < ex.parallelism:
                unit = queue.popleft()
                for spec, _ in unit:
                    store.mark_running(sweep_id, spec.config_hash, worker=ex.name)
                # tracking is mirrored here, under the sweep's parent run, not by the worker
                configs = [{**spec.config, "tracking": dict(DEFAULTS["tracking"])} for spec, _ in unit]
                ex.submit(execute_runs, {"configs": configs, "run_dirs": [str(d) for _, d in unit],
                                         "cache_root": cache_root, "ship": ship, **ex.task_options()}, tag=unit)
            unit, outcome = ex.next_result()
            entries = outcome.value["runs"] if outcome.ok else [{}] * len(unit)
            for (spec, run_dir), entry in zip(unit, entries):
                summary.executed += 1
                error = entry.get("error") if outcome.ok else outcome.error
                _record(spec, run_dir, entry if error is None else None, error, outcome, len(unit), store, sweep_id,
                        summary, f"[{summary.executed}/{total}] {spec.run_id}", log, mirror)
    finally:
        ex.close()


def _together(result: dict) -> str:
    batched = (result.get("train") or {}).get("batched")
    return f", trained with {batched - 1} other(s)" if batched else ""


def _record(spec: RunSpec, run_dir: Path, value: dict | None, error: str | None, outcome, share: int,
            store: ResultStore, sweep_id: str, summary: SweepSummary, prefix: str, log, mirror) -> None:
    """Store one run's outcome (``value``: what its task returned for it, or None with ``error``)."""
    seconds = outcome.seconds / share
    if value is not None:
        try:
            if "files" in value:
                write_run_files(run_dir, value["files"])
            result = finished_result(run_dir, spec.config_hash)
            if result is None:
                raise RuntimeError(f"the run returned but {run_dir / RESULT_FILE} is not a finished "
                                   "result of this config")
            store.mark_done(sweep_id, spec.config_hash, result, worker=outcome.worker, seconds=seconds)
            if mirror is not None:
                mirror(result, run_dir)
            m = result["metrics"]
            log(f"{prefix} done   {spec.title}: acc {m['accuracy'] * 100:.2f}% ECE {m['ece'] * 100:.2f}% "
                f"({seconds:.1f} s{_together(result)})")
            for flag in result.get("flags") or []:
                log(f"{' ' * len(prefix)} flag   {flag['code']}: {flag['message']}")
            if result.get("flags"):
                summary.flagged.append({"run_id": spec.run_id, "title": spec.title,
                                        "flags": [f["code"] for f in result["flags"]]})
            return
        except Exception as err:  # noqa: BLE001 - a bad result is a failed run, not a dead sweep
            error = f"{type(err).__name__}: {err}"
    store.mark_failed(sweep_id, spec.config_hash, error or "unknown error", worker=outcome.worker, seconds=seconds)
    first = (error or "").strip().splitlines()[0] if error else "unknown error"
    summary.failures.append({"run_id": spec.run_id, "run": spec.title, "error": first})
    log(f"{prefix} FAILED {spec.title}: {first}")


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write a shipped run's files atomically, ``metrics.json`` last (its presence marks it finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    for name, data in files.items():
        if name != RESULT_FILE and "/" not in name and not name.startswith("."):
            atomic_write_bytes(run_dir / name, data)
    if RESULT_FILE in files:
        atomic_write_bytes(run_dir / RESULT_FILE, files[RESULT_FILE])


def _write_sweep_file(out_dir: Path, sweep_id: str, grid: Grid, specs: list[RunSpec], url: str,
                      previous: dict) -> None:
    from calibprompt.experiments.store import now

    data = {
        "format": SWEEP_FORMAT,
        "sweep_id": sweep_id,
        "name": grid.name,
        "store": public_url(url),
        "store_default": url == default_url(out_dir),  # DIR/results.sqlite: found again if DIR moves
        "grid_source": grid.source,
        "grid": grid.spec,
        "effective": {**grid.describe(), "base": grid.base},
        "created_at": previous.get("created_at") or now().isoformat(),
        "updated_at": now().isoformat(),
        "runs": [{"run_id": s.run_id, "config_hash": s.config_hash, **s.labels()} for s in specs],
    }
    atomic_write_json(out_dir / SWEEP_FILE, data)
