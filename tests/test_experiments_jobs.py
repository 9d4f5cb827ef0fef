"""`calibprompt sweep --jobs N`: cells in worker processes on this machine, the same results as one
process, and still one encoding per image (workers share the on-disk feature cache and its lock)."""

from __future__ import annotations

import json

import torch
import yaml

from calibprompt.cli import main
from tests.tiny_models import tiny_model_dir, write_image_folder


def _results(out):
    runs = {}
    for path in sorted((out / "runs").glob("*/metrics.json")):
        result = json.loads(path.read_text())
        runs[path.parent.name] = result
    return runs


def test_jobs_match_one_process_and_encode_each_image_once(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model", "clip")
    images = write_image_folder(tmp_path / "images", n_train=8, n_test=6)
    spec = {"name": "jobs", "base": {"train": {"epochs": 2, "batch_size": 2}, "eval": {"bootstrap": 0}},
            "backbones": {"tiny": {"path": str(model)}},
            "datasets": {"imgs": {"source": "folder", "path": str(images)}},
            "methods": {"CoOp-CE": "coop-ce", "CalibPrompt": "calibprompt"}, "shots": 2, "seeds": [1, 2]}
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    summaries = {}
    for jobs in (2, 1):
        out = tmp_path / f"sweep{jobs}"
        assert main(["sweep", str(grid), "--out", str(out), "--jobs", str(jobs), "--json", "-q",
                     "--cache-dir", str(tmp_path / f"cache{jobs}")]) == 0
        summaries[jobs] = json.loads(capsys.readouterr().out)
    assert summaries[2]["done"] == summaries[1]["done"] == 4 and summaries[2]["failed"] == 0
    parallel, serial = _results(tmp_path / "sweep2"), _results(tmp_path / "sweep1")
    assert parallel.keys() == serial.keys() and len(parallel) == 4
    for run_id, result in serial.items():
        for metric in ("accuracy", "ece", "nll"):
            # workers run with cores / jobs torch threads, and float sums depend on the thread count
            assert abs(parallel[run_id]["metrics"][metric] - result["metrics"][metric]) <= 1e-4, (run_id, metric)
    encoded = {jobs: sum(r["images_encoded"] for r in runs.values())
               for jobs, runs in ((2, parallel), (1, serial))}
    assert encoded[2] == encoded[1] > 0  # the second worker found on disk what the first encoded
    assert (tmp_path / "sweep2" / "log.txt").is_file()


def test_a_worker_that_waited_for_the_encode_lock_reads_what_the_other_wrote(tmp_path, monkeypatch):
    """Deterministic: while cache B waits for the encode lock, cache A (another worker) encodes the same
    images; B then finds them on disk and encodes none."""
    import contextlib

    from calibprompt.backbones import load_backbone
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache

    backbone = load_backbone({"path": str(tiny_model_dir(tmp_path / "model", "clip"))})
    dataset = open_dataset({"source": "folder", "path": str(write_image_folder(tmp_path / "images", n_train=4, n_test=3))})
    samples = dataset.samples[:6]
    a, b = FeatureCache(tmp_path / "shared"), FeatureCache(tmp_path / "shared")
    real = b._encode_lock

    @contextlib.contextmanager
    def waited(weights):
        a.features(backbone, dataset, samples)  # the other worker, done while B was waiting
        with real(weights):
            yield

    monkeypatch.setattr(b, "_encode_lock", waited)
    feats = b.features(backbone, dataset, samples)
    assert a.encoded == 6 and b.encoded == 0
    assert torch.equal(feats, a.features(backbone, dataset, samples))
