"""Experiment tracking is a mirror: a sweep with --mlflow / --tensorboard, read back with MLflow's own
client (a real local SQLite store) and TensorBoard's own event reader."""

from __future__ import annotations

import json

import pytest
import yaml

from calibprompt.cli import main
from tests.tiny_models import tiny_model_dir, write_image_folder

mlflow = pytest.importorskip("mlflow", reason="experiment tracking needs the extra: pip install 'calibprompt[tracking]'")
pytest.importorskip("tensorboard", reason="experiment tracking needs the extra: pip install 'calibprompt[tracking]'")
EPOCHS = 3


def test_a_sweep_mirrored_to_mlflow_and_tensorboard(tmp_path, capsys):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_model_dir(tmp_path / "model", "clip")
    images = write_image_folder(tmp_path / "images", n_train=8, n_test=6)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "tracked", "base": {"train": {"epochs": EPOCHS, "batch_size": 2}, "eval": {"bootstrap": 0},
                                    "tracking": {"experiment": "calibprompt-test"}},
        "backbones": {"tiny": {"path": str(model)}}, "datasets": {"imgs": {"source": "folder", "path": str(images)}},
        "methods": {"CalibPrompt": "calibprompt"}, "shots": 2, "seeds": [1, 2]}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--mlflow", uri, "--tensorboard", "--json", "-q",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/metrics.json")}

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("calibprompt-test")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep tracked"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.metrics["runs_done"] == 2
    for child in children:
        result = results[child.data.tags["calibprompt.run_id"]]
        assert child.data.params["method"] == "calibprompt" and child.data.params["seed"] == str(result["seed"])
        assert child.data.metrics["ece"] == pytest.approx(result["metrics"]["ece"], abs=1e-12)
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
            result["train"]["epoch_losses"], abs=1e-12)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"metrics.json", "predictions.csv", "reliability.png", "prompt.safetensors"} <= artifacts

    for run_id, result in results.items():
        events = EventAccumulator(str(out / "runs" / run_id / "tensorboard"))
        events.Reload()
        losses = [e.value for e in events.Scalars("train/loss")]
        assert len(losses) == EPOCHS and losses == pytest.approx(result["train"]["epoch_losses"], rel=1e-6)
        assert events.Scalars("test/ece")[0].value == pytest.approx(result["metrics"]["ece"], rel=1e-6)
    assert (tmp_path / "mlflow.artifacts").is_dir()  # artifacts beside the store, not in ./mlruns
    # a tracking store that cannot be opened gives notes; the sweep and its runs are done as ever
    bad = "sqlite:////proc/calibprompt-none/x.db"  # a folder that cannot be created
    assert main(["sweep", str(grid), "--out", str(tmp_path / "other"), "--mlflow", bad, "--json", "-q",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out)["done"] == 2 and "tracking: MLflow" in printed.err
    # the source of truth is unchanged: tracking is not part of a run's identity
    assert main(["sweep", str(grid), "--out", str(out), "--json", "-q", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["executed"] == 0
