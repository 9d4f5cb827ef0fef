"""Experiment tracking: a mirror of finished runs in TensorBoard and MLflow (the ``tracking`` extra).

The run folder and the sweep's results store stay the source of truth; tracking copies what a run
recorded, after it finished, so a tracking server that is down cannot lose or change a result (a
failed mirror is a note, not a failed run). Config::

    tracking: {tensorboard: true, mlflow: sqlite:///mlruns.db, experiment: my-study}

* TensorBoard: event files in ``RUN/tensorboard/``: ``train/loss`` per epoch, ``test/<metric>`` for
  every final metric, the resolved config as text. ``tensorboard --logdir SWEEP_DIR`` shows every run.
* MLflow: one MLflow run per calibprompt run in experiment ``experiment`` (default "calibprompt"):
  parameters (method, backbone, dataset, shots, seed, the method's own), ``train_loss`` per epoch,
  final metrics, and artifacts (metrics.json, predictions.csv, reliability.png, the learned prompt or
  head); a sweep is the parent run of its runs (tag ``mlflow.parentRunId``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibprompt.progress import note

ARTIFACTS = ("metrics.json", "predictions.csv", "reliability.png", "prompt.safetensors", "head.safetensors",
             "config.yaml")


def enabled(tracking: dict | None) -> bool:
    return bool(tracking) and bool(tracking.get("tensorboard") or tracking.get("mlflow"))


def _client(tracking: dict):
    from mlflow import MlflowClient

    uri = str(tracking["mlflow"])
    client = MlflowClient(tracking_uri=uri)
    name = tracking.get("experiment") or "calibprompt"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return client, found.experiment_id
    return client, client.create_experiment(name, artifact_location=artifact_location(uri))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (``DB.artifacts/``), not in
    ``./mlruns`` of whatever folder the command ran in; a server (http, databricks) decides for itself."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser().absolute()
        return (db.parent / f"{db.stem}.artifacts").as_uri()
    return None


def start_sweep(tracking: dict | None, name: str, sweep_id: str, params: dict[str, Any]) -> str | None:
    """The MLflow parent run of a sweep (None without MLflow, or with a note when MLflow fails: the sweep
    goes on, its runs then mirror without a parent)."""
    if not (tracking and tracking.get("mlflow")):
        return None
    try:
        client, experiment = _client(tracking)
        parent = client.create_run(experiment, run_name=f"sweep {name}", tags={"calibprompt.sweep_id": sweep_id})
        for key, value in params.items():
            client.log_param(parent.info.run_id, key, str(value)[:6000])
    except Exception as err:  # noqa: BLE001 - a mirror, not the record
        note(f"tracking: MLflow at {tracking['mlflow']} failed to open the sweep's run ({type(err).__name__}: {err})")
        return None
    return parent.info.run_id


def end_sweep(tracking: dict | None, parent: str | None, counts: dict[str, Any] | None) -> None:
    """Close the parent run: FINISHED, FAILED when a run failed, KILLED when the sweep stopped (``counts``
    None). A failure is a note."""
    if parent is None:
        return
    try:
        client, _ = _client(tracking)
        for key, value in (counts or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                client.log_metric(parent, f"runs_{key}", float(value))
        status = "KILLED" if counts is None else "FAILED" if counts.get("failed") else "FINISHED"
        client.set_terminated(parent, status)
    except Exception as err:  # noqa: BLE001
        note(f"tracking: MLflow at {tracking['mlflow']} failed to close the sweep's run ({type(err).__name__}: {err})")


def mirror_run(result: dict, run_dir: str | Path, tracking: dict | None, parent: str | None = None) -> dict:
    """Copy a finished run into the enabled trackers; returns where it went (``{}`` when off). A tracker
    that fails becomes a note naming it; the run stays done."""
    out: dict = {}
    if not enabled(tracking):
        return out
    run_dir = Path(run_dir)
    if tracking.get("tensorboard"):
        try:
            out["tensorboard"] = str(_tensorboard(result, run_dir))
        except Exception as err:  # noqa: BLE001 - a mirror, not the record
            note(f"tracking: TensorBoard mirror of run {result.get('run_id')} failed ({type(err).__name__}: {err})")
    if tracking.get("mlflow"):
        try:
            out["mlflow_run_id"] = _mlflow(result, run_dir, tracking, parent)
        except Exception as err:  # noqa: BLE001
            note(f"tracking: MLflow mirror of run {result.get('run_id')} to {tracking['mlflow']} failed "
                 f"({type(err).__name__}: {err})")
    return out


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _tensorboard(result: dict, run_dir: Path) -> Path:
    import yaml
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / "tensorboard"
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for epoch, loss in enumerate((result.get("train") or {}).get("epoch_losses") or [], start=1):
            writer.add_scalar("train/loss", float(loss), epoch)
        for name, value in _numbers(result.get("metrics")).items():
            writer.add_scalar(f"test/{name}", value, 0)
        writer.add_text("config", "```\n" + yaml.safe_dump(result.get("config") or {}, sort_keys=False) + "\n```")
    finally:
        writer.close()
    return folder


def _params(result: dict) -> dict[str, str]:
    cfg = result.get("config") or {}
    method = cfg.get("resolved_method") or {}
    params = {"method": result.get("method"), "backbone": result.get("backbone"), "dataset": result.get("dataset"),
              "shots": result.get("shots"), "seed": result.get("seed"), "config_hash": result.get("config_hash"),
              "posthoc": method.get("posthoc"),
              "losses": ", ".join(f"{t['name']}x{t.get('weight', 1)}" for t in method.get("losses") or [])}
    params.update({f"method.{k}": v for k, v in (method.get("params") or {}).items()})
    return {k: str(v)[:6000] for k, v in params.items() if v is not None}


def _mlflow(result: dict, run_dir: Path, tracking: dict, parent: str | None) -> str:
    from mlflow.entities import Metric, Param

    client, experiment = _client(tracking)
    tags = {"calibprompt.run_id": str(result.get("run_id")), "calibprompt.run_dir": str(run_dir)}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment, run_name=f"{result.get('method')} · {result.get('dataset')} · "
                                                 f"seed {result.get('seed')}", tags=tags)
    rid = run.info.run_id
    stamp = int(run.info.start_time or 0)
    metrics = [Metric("train_loss", float(v), stamp, step)
               for step, v in enumerate((result.get("train") or {}).get("epoch_losses") or [], start=1)]
    metrics += [Metric(name, value, stamp, 0) for name, value in _numbers(result.get("metrics")).items()]
    params = [Param(k, v) for k, v in _params(result).items()]
    for start in range(0, max(len(metrics), len(params), 1), 100):  # MLflow's batch limits
        client.log_batch(rid, metrics=metrics[start:start + 100], params=params[start:start + 100])
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(rid, str(run_dir / name))
    client.set_terminated(rid)
    return rid
