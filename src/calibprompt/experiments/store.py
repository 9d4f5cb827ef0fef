"""The results store: one row per (sweep, run), in SQLite by default or any SQLAlchemy database.

Tables (schema in docs/experiments.md):

* ``calibprompt_sweeps``: one row per sweep folder (``sweep_id`` from ``DIR/sweep.json``);
* ``calibprompt_runs``: one row per planned run, keyed by (``sweep_id``, ``config_hash``), with its
  labels, status (``pending``, ``running``, ``done``, ``failed``), resolved config, metrics (JSON and the
  main ones as columns for SQL), timings, versions, error and attempts.

Only the process that drives a sweep (or a tuning study) writes rows; workers never need the database.
A row says ``done`` only after the run's ``metrics.json`` was written; the sweep additionally checks
that file (status done, same config hash) before it skips a run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import make_url

from calibprompt.metrics.registry import stored_metrics

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
METRIC_COLUMNS = stored_metrics()  # the store's schema: metrics kept as columns (metrics.registry)
DEFAULT_DB = "results.sqlite"
STORE_ENV = "CALIBPROMPT_STORE"

metadata = MetaData()

sweeps = Table(
    "calibprompt_sweeps", metadata,
    Column("sweep_id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("out_dir", Text, nullable=False),
    Column("grid", JSON),  # the grid spec as given
    Column("schema_version", Integer, nullable=False, default=SCHEMA_VERSION),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

runs = Table(
    "calibprompt_runs", metadata,
    Column("sweep_id", String(32), primary_key=True),
    Column("config_hash", String(64), primary_key=True),
    Column("run_id", String(16), nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("backbone", String(200), nullable=False),
    Column("dataset", String(200), nullable=False),
    Column("method", String(200), nullable=False),
    Column("shots", Integer, nullable=False),
    Column("seed", Integer, nullable=False),
    Column("variant", JSON),  # sweep values of this run: {dotted key: value}
    Column("variant_key", String(500), nullable=False, default=""),
    Column("position", Integer, nullable=False, default=0),  # order in the grid
    *[Column(name, Float) for name in METRIC_COLUMNS],
    Column("metrics", JSON),
    Column("metrics_reference", JSON),
    Column("timings", JSON),
    Column("versions", JSON),
    Column("config", JSON),  # resolved config (from metrics.json once done)
    Column("result", JSON),  # the rest of metrics.json (train info, posthoc, counts)
    Column("error", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(200)),
    Column("run_dir", Text),
    Column("created_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("seconds", Float),
)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def default_url(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).absolute() / DEFAULT_DB}"


def public_url(url: str) -> str:
    """The URL with any password masked (what gets written to files and printed)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL fails later with SQLAlchemy's own message
        return url


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ResultStore:
    """SQLAlchemy-backed store of sweep runs (see module docstring)."""

    def __init__(self, url: str):
        from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError

        self.url = url
        kwargs: dict[str, Any] = {}
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise ValueError(f"--store {url!r} is not a database URL; use e.g. sqlite:///runs/results.db or "
                             "postgresql://user@host/db") from None
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 60}
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(url, **kwargs)
            if parsed.get_backend_name() == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            metadata.create_all(self.engine)
        except NoSuchModuleError:
            raise ValueError(f"--store {public_url(url)}: unknown database kind {parsed.drivername!r}; use "
                             "sqlite:///FILE or a SQLAlchemy URL whose driver is installed") from None
        except DatabaseError as err:
            raise ValueError(f"results store {public_url(url)} cannot be opened as a database "
                             f"({str(err.orig).splitlines()[0] if err.orig else err}); point --store at a new "
                             "file or a database") from None

    @classmethod
    def for_dir(cls, out_dir: str | Path, url: str | None = None) -> "ResultStore":
        return cls(url or os.environ.get(STORE_ENV) or default_url(out_dir))

    def close(self) -> None:
        self.engine.dispose()

    # ---- sweeps ---------------------------------------------------------------------------------
    def sweep_for_dir(self, out_dir: str | Path) -> str | None:
        """The id of the sweep recorded for this output folder, if any (the oldest one)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(sweeps.c.sweep_id).where(sweeps.c.out_dir == str(out_dir))
                               .order_by(sweeps.c.created_at)).first()
        return row[0] if row else None

    def ensure_sweep(self, sweep_id: str, name: str, out_dir: str, grid: dict | None) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(sweeps.c.sweep_id).where(sweeps.c.sweep_id == sweep_id)).first()
            values = {"name": name, "out_dir": str(out_dir), "grid": _jsonable(grid), "updated_at": now()}
            if row is None:
                conn.execute(sweeps.insert().values(sweep_id=sweep_id, schema_version=SCHEMA_VERSION,
                                                    created_at=now(), **values))
            else:
                conn.execute(sweeps.update().where(sweeps.c.sweep_id == sweep_id).values(**values))

    def sweep(self, sweep_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(sweeps).where(sweeps.c.sweep_id == sweep_id)).mappings().first()
        return dict(row) if row else None

    # ---- runs -----------------------------------------------------------------------------------
    def get(self, sweep_id: str, config_hash: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs).where(runs.c.sweep_id == sweep_id,
                                                  runs.c.config_hash == config_hash)).mappings().first()
        return dict(row) if row else None

    def rows(self, sweep_id: str, hashes: Iterable[str] | None = None,
             status: str | None = None) -> list[dict]:
        query = select(runs).where(runs.c.sweep_id == sweep_id)
        if status is not None:
            query = query.where(runs.c.status == status)
        with self.engine.connect() as conn:
            out = [dict(r) for r in conn.execute(query.order_by(runs.c.position)).mappings()]
        if hashes is not None:
            wanted = set(hashes)
            out = [r for r in out if r["config_hash"] in wanted]
        return out

    def counts(self, sweep_id: str, hashes: Iterable[str] | None = None) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for row in self.rows(sweep_id, hashes):
            out[row["status"]] = out.get(row["status"], 0) + 1
        return out

    def plan(self, sweep_id: str, spec, position: int, run_dir: str) -> dict:
        """Insert the run's row as pending (if absent) and return the row."""
        with self.engine.begin() as conn:
            row = conn.execute(select(runs).where(runs.c.sweep_id == sweep_id,
                                                  runs.c.config_hash == spec.config_hash)).mappings().first()
            labels = {"backbone": spec.backbone, "dataset": spec.dataset, "method": spec.method,
                      "shots": spec.shots, "seed": spec.seed, "variant": _jsonable(spec.variant),
                      "variant_key": spec.variant_key, "position": position, "run_dir": run_dir}
            if row is None:
                conn.execute(runs.insert().values(sweep_id=sweep_id, config_hash=spec.config_hash,
                                                  run_id=spec.run_id, status="pending", attempts=0,
                                                  created_at=now(), **labels))
            else:
                conn.execute(runs.update().where(runs.c.sweep_id == sweep_id,
                                                 runs.c.config_hash == spec.config_hash).values(**labels))
        return self.get(sweep_id, spec.config_hash)

    def mark_pending(self, sweep_id: str, config_hash: str) -> None:
        self._update(sweep_id, config_hash, status="pending")

    def mark_running(self, sweep_id: str, config_hash: str, worker: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.sweep_id == sweep_id, runs.c.config_hash == config_hash)
                         .values(status="running", started_at=now(), finished_at=None, error=None,
                                 worker=worker, attempts=runs.c.attempts + 1))

    def mark_done(self, sweep_id: str, config_hash: str, result: dict, worker: str | None = None,
                  seconds: float | None = None) -> None:
        if result.get("status") != "done" or result.get("config_hash") != config_hash:
            raise ValueError(f"refusing to record run {config_hash[:16]} as done: its result has status "
                             f"{result.get('status')!r} and hash {str(result.get('config_hash'))[:16]}")
        metrics = result.get("metrics") or {}
        rest = {k: v for k, v in result.items()
                if k not in ("metrics", "metrics_reference", "timings", "versions", "config")}
        values = {name: _float(metrics.get(name)) for name in METRIC_COLUMNS}
        values.update(status="done", error=None, finished_at=now(), metrics=_jsonable(metrics),
                      metrics_reference=_jsonable(result.get("metrics_reference")),
                      timings=_jsonable(result.get("timings")), versions=_jsonable(result.get("versions")),
                      config=_jsonable(result.get("config")), result=_jsonable(rest))
        if worker is not None:
            values["worker"] = worker
        if seconds is not None:
            values["seconds"] = seconds
        self._update(sweep_id, config_hash, **values)

    def mark_failed(self, sweep_id: str, config_hash: str, error: str, worker: str | None = None,
                    seconds: float | None = None) -> None:
        values: dict[str, Any] = {"status": "failed", "error": error, "finished_at": now()}
        if worker is not None:
            values["worker"] = worker
        if seconds is not None:
            values["seconds"] = seconds
        self._update(sweep_id, config_hash, **values)

    def _update(self, sweep_id: str, config_hash: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.sweep_id == sweep_id, runs.c.config_hash == config_hash)
                         .values(**values))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout = 60000")
    cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer (sweeps sharing a store)
    cursor.close()


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays and Paths converted, NaN and infinities -> null (not every
    database accepts them in JSON columns)."""
    if obj is None:
        return None
    from calibprompt.settings import _json_default, strict_json

    return strict_json(json.loads(json.dumps(obj, default=_json_default)))
