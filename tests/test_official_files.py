"""A dataset folder after the official CalibPrompt code ran on it: its cache files are ignored, its
few-shot split pickle imports as the same shots, and a pickle with any other global is refused."""

from __future__ import annotations

import os
import pickle
import sys
import types

import numpy as np
import pytest
from PIL import Image

from calibprompt.data import DataError, open_dataset
from calibprompt.data.official import import_official_split


def _dassl_module():
    """A stand-in ``Datum`` under Dassl's module path, so pickles carry the official global name."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    module = sys.modules[names[-1]]

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
    module.Datum = Datum
    return Datum


@pytest.fixture
def official_folder(tmp_path):
    root = tmp_path / "covid"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("covid", "normal"):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "classnames.txt").write_text("covid covid\nnormal normal\n")
    Datum = _dassl_module()
    other_machine = "/home/someone/data/covid/images"
    train = [Datum(f"{other_machine}/train/covid/1.png", 0, "covid"), Datum(f"{other_machine}/train/covid/3.png", 0, "covid"),
             Datum(f"{other_machine}/train/normal/0.png", 1, "normal"), Datum(f"{other_machine}/train/normal/2.png", 1, "normal")]
    (root / "split_fewshot").mkdir()
    with open(root / "split_fewshot" / "shot_2-seed_1.pkl", "wb") as handle:
        pickle.dump({"train": train}, handle, protocol=pickle.HIGHEST_PROTOCOL)
    with open(root / "preprocessed.pkl", "wb") as handle:
        pickle.dump({"train": train, "test": []}, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return root


def test_folder_after_the_official_code_ran_opens_and_imports_its_split(official_folder):
    ds = open_dataset({"source": "folder", "path": str(official_folder)})
    assert ds.classnames == ["covid", "normal"] and len(ds.samples_in("test")) == 8
    split = import_official_split(official_folder / "split_fewshot" / "shot_2-seed_1.pkl", ds)
    assert split.train == ["train/covid/1.png", "train/covid/3.png", "train/normal/0.png", "train/normal/2.png"]
    assert split.shots == 2 and split.seed == 1 and split.val == [] and len(split.test) == 8


def test_a_run_trains_on_exactly_the_official_shots(official_folder, tmp_path):
    from calibprompt.config import load_config
    from calibprompt.engine.run import run
    from tests.tiny_models import tiny_model_dir

    cfg = load_config(None, ["shots=2", "train.epochs=1", "train.batch_size=4"],
                      base={"backbone": {"path": str(tiny_model_dir(tmp_path / "m", "clip"))},
                            "data": {"source": "folder", "path": str(official_folder)}, "method": {"name": "coop-ce"},
                            "split_file": str(official_folder / "split_fewshot" / "shot_2-seed_1.pkl")})
    result = run(cfg, tmp_path / "run", quiet=True)
    import json

    written = json.loads((tmp_path / "run" / "split.json").read_text())
    assert [item["ref"] for item in written["train"]] == ["train/covid/1.png", "train/covid/3.png",
                                                          "train/normal/0.png", "train/normal/2.png"]
    assert result["status"] == "done"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/calibprompt-split-pwned",))


def test_a_pickle_with_any_other_global_is_refused(official_folder, tmp_path):
    ds = open_dataset({"source": "folder", "path": str(official_folder)})
    bad = tmp_path / "shot_2-seed_1.pkl"
    with open(bad, "wb") as handle:
        pickle.dump({"train": [_Payload()]}, handle)
    if os.path.exists("/tmp/calibprompt-split-pwned"):
        os.remove("/tmp/calibprompt-split-pwned")
    with pytest.raises(DataError, match="posix.system is not allowed|os.system is not allowed"):
        import_official_split(bad, ds)
    assert not os.path.exists("/tmp/calibprompt-split-pwned")
    with open(bad, "wb") as handle:
        pickle.dump({"train": [{"impath": "x"}], "extra": set()}, handle)
    ok = import_official_split  # a dict of plain values unpickles but holds no Datum records
    with pytest.raises(DataError, match="is not in dataset"):
        ok(bad, ds)


def test_printed_metrics_name_their_convention(official_folder, tmp_path, capsys):
    import json

    import yaml

    from calibprompt.cli import main
    from tests.tiny_models import tiny_model_dir

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backbone": {"path": str(tiny_model_dir(tmp_path / "m", "clip"))},
                                   "data": {"source": "folder", "path": str(official_folder)},
                                   "method": {"name": "zeroshot"}, "shots": 2}))
    assert main(["eval", str(cfg), "--out", str(tmp_path / "a"), "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["convention"] == "standard"
    assert main(["eval", str(cfg), "--out", str(tmp_path / "b"), "--set", "backbone.parity=reference"]) == 0
    out = capsys.readouterr().out
    recorded = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics_reference"]
    assert "reference metrics (the official code's definitions)" in out
    assert f"mce {recorded['mce'] * 100:.2f}%" in out
