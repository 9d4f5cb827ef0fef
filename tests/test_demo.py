"""`calibprompt demo` end to end on the real PneumoniaMNIST file with a micro model pretrained for
seconds: the table, summary.json rows, paired per-seed differences, the report and its figures."""

from __future__ import annotations

import json

import pytest

from calibprompt.cli import main
from calibprompt.demo import load_demo_config, parse_seeds, verdict
from tests.conftest import require_shared
from tests.tiny_models import pretrain_tiny_micro

TINY_CONFIG = """
run:
  shots: 8
  val_shots: 8
  train: {epochs: 6, batch_size: 16, optimizer: adam, lr: 0.002, n_views: 2}
reference: coop-ce
methods:
  - {label: Zero-shot, method: {name: zeroshot}}
  - {label: CoOp-CE, method: {name: coop-ce}}
  - {label: CalibPrompt + TS, method: {name: calibprompt+ts, alpha: 0.1, lambda_as: 1.0}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return pretrain_tiny_micro(tmp_path_factory.mktemp("model") / "micro", steps=20)


def test_demo_cli_writes_table_summary_and_report(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CALIBPROMPT_DATA", str(require_shared("medmnist/pneumoniamnist.npz").parent.parent))
    config = tmp_path / "demo.yaml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--config", str(config), "--model", str(tiny_model),
                 "--seeds", "2", "--dataset", "pneumoniamnist", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for text in ("Zero-shot", "CoOp-CE", "CalibPrompt + TS", "Accuracy (%)", "ECE (%)", "MCE (%)",
                 "Adaptive ECE (%)", "NLL", "Brier", "±", "Paired per-seed differences"):
        assert text in printed, text

    rows = json.loads((out / "summary.json").read_text())
    assert isinstance(rows, list) and [r["method"] for r in rows] == ["zeroshot", "coop-ce", "calibprompt+ts"]
    for row in rows:
        for key in ("method", "accuracy_mean", "ece_mean", "ece_std", "mce_mean", "adaptive_ece_mean", "nll_mean",
                    "brier_mean"):
            assert key in row, key
        assert row["n_seeds"] == 2 and len(row["ece_per_seed"]) == 2 and row["n_test"] == 624
        assert 0 <= row["ece_mean"] <= 1 and 0 <= row["accuracy_mean"] <= 1
    paired = json.loads((out / "paired.json").read_text())
    calib = next(p for p in paired if p["method"] == "calibprompt+ts")
    per_seed = {r["method"]: r["ece_per_seed"] for r in rows}
    assert calib["ece"]["per_seed"] == pytest.approx(
        [a - b for a, b in zip(per_seed["calibprompt+ts"], per_seed["coop-ce"])])

    report = (out / "report.md").read_text()
    assert "| Method |" in report and "reliability.png" in report and "Paired per-seed" in report
    assert (out / "reliability.png").stat().st_size > 1000 and (out / "per_seed.png").is_file()
    for seed in (1, 2):
        split = json.loads((out / "splits" / f"pneumoniamnist-seed{seed}.json").read_text())
        assert len(split["train"]) == 16 and len(split["val"]) == 16 and len(split["test"]) == 624
        assert all(x["ref"].startswith("train/") for x in split["train"])
        assert all(x["ref"].startswith("val/") for x in split["val"])
        assert all(x["ref"].startswith("test/") for x in split["test"])

    # A second call reuses every finished run (same model weights and settings).
    main(["demo", "--out", str(out), "--config", str(config), "--model", str(tiny_model), "--seeds", "2", "--quiet"])
    assert json.loads((out / "summary.json").read_text()) == rows


def test_demo_config_and_helpers():
    cfg = load_demo_config()
    labels = [m["label"] for m in cfg["methods"]]
    assert labels[:2] == ["Zero-shot", "CoOp-CE"] and "CalibPrompt + TS" in labels and len(cfg["seeds"]) >= 5
    assert cfg["run"]["train"]["optimizer"] == "adam"
    assert parse_seeds(3) == [1, 2, 3] and parse_seeds("1,4") == [1, 4] and parse_seeds([2, 5]) == [2, 5]
    with pytest.raises(ValueError):
        parse_seeds("1,1")
    ece = {"per_seed": [-0.02, -0.03, -0.01], "ci95": [-0.04, -0.005], "n_lower": 3, "n_higher": 0}
    acc = {"mean": -0.004}
    assert verdict(ece, acc).startswith("lower ECE in 3/3") and "within 1 point" in verdict(ece, acc)


def test_unknown_demo_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methodz: []\n")
    with pytest.raises(ValueError, match="methodz"):
        load_demo_config(bad)


ABLATION_CONFIG = """
run:
  shots: 8
  val_shots: 4
  train: {epochs: 2, batch_size: 16, optimizer: adam, lr: 0.002, augment: false}
reference: coop-ce
methods:
  - {label: CoOp-CE, method: {name: coop-ce}}
  - {label: CalibPrompt, method: {name: calibprompt, alpha: 0.1, lambda_as: 1.0}}
"""


def test_demo_shots_ablation_writes_rows_figure_claims_and_a_report_section(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CALIBPROMPT_DATA", str(require_shared("medmnist/pneumoniamnist.npz").parent.parent))
    config = tmp_path / "demo.yaml"
    config.write_text(ABLATION_CONFIG)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# calibprompt demo\n\nthe main table\n")
    args = ["demo", "--ablation", "shots", "--out", str(out), "--config", str(config), "--model", str(tiny_model),
            "--seeds", "2", "--dataset", "pneumoniamnist", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "shots=16" in printed and "More shots improve CalibPrompt's accuracy and calibration" in printed
    stored = json.loads((out / "ablation.json").read_text())
    rows = stored["shots"]["rows"]
    assert sorted({(r["method"], r["value"]) for r in rows}) == sorted(
        (m, float(v)) for m in ("coop-ce", "calibprompt") for v in (1, 2, 4, 8, 16))
    for r in rows:
        assert r["n"] == 2 and len(r["ece_per_seed"]) == 2 and 0 <= r["accuracy_mean"] <= 1
    assert stored["shots"]["claims"][0]["verdict"] in ("supported", "not supported")
    assert (out / "figures" / "ablation_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0  # again: the section is replaced, not repeated; the main report is kept
    report = (out / "report.md").read_text()
    assert report.startswith("# calibprompt demo") and report.count("## Ablation: shots") == 1
    assert "![ablation shots](figures/ablation_shots.png)" in report


def test_demo_robustness_writes_rows_paired_differences_and_a_report_section(tiny_model, tmp_path, monkeypatch):
    from calibprompt.demo.robustness import run_robustness

    monkeypatch.setenv("CALIBPROMPT_DATA", str(require_shared("medmnist/pneumoniamnist.npz").parent.parent))
    monkeypatch.setenv("CALIBPROMPT_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "demo.yaml"
    config.write_text(ABLATION_CONFIG)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# calibprompt demo\n\nthe main table\n")
    done = run_robustness(out, dataset="pneumoniamnist", seeds=2, config=config, model=tiny_model, quiet=True,
                          n0=2, n=8, max_images=10)
    stored = json.loads((out / "robustness.json").read_text())
    assert [r["label"] for r in stored["rows"]] == ["CoOp-CE", "CalibPrompt", "PromptSmooth", "PromptSmooth + AS"]
    for row in stored["rows"]:
        assert row["n_seeds"] == 2 and len(row["noisy_ece"]["per_seed"]) == 2
        assert set(row["certified_accuracy"]) == {"0.0", "0.125", "0.25", "0.375", "0.5"}
    assert stored["paired"]["reference"] == "PromptSmooth" and len(stored["paired"]["noisy_ece"]["per_seed"]) == 2
    assert stored["settings"]["sigma"] == 0.25 and stored["settings"]["max_images"] == 10
    kinds = {json.loads(p.read_text())["config"]["resolved_method"]["kind"]
             for p in (out / "robustness" / "runs").glob("*/seed*/metrics.json")}
    assert kinds == {"coop", "promptsmooth"}
    report = (out / "report.md").read_text()
    assert report.startswith("# calibprompt demo") and "## Robustness: Gaussian noise sigma 0.25" in report
    assert "PromptSmooth + AS vs PromptSmooth" in done["text"]
