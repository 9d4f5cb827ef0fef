"""The typed run config: `calibprompt config validate` names every bad key (exit 2) without loading
data or a model, and `calibprompt config schema` is a JSON Schema that an editor's validator enforces."""

from __future__ import annotations

import json

import pytest

from calibprompt.cli import main
from calibprompt.config import DEFAULTS, json_schema, validate_file

BAD = """shots: -3
train: {epochs: ten}
eval: {n_bins: 0}
prompt: {position: middel}
backbone: {pth: /x}
data: {source: folder, path: /nonexistent}
"""


def test_validate_names_each_bad_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    problems = validate_file(bad)
    text = "\n".join(problems)
    for key in ("shots: -3", "train.epochs: 'ten'", "eval.n_bins: 0", "prompt.position: 'middel'", "'pth'"):
        assert key in text, (key, text)
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{bad}:") == 5
    good = tmp_path / "good.yaml"
    good.write_text("backbone: {name: plip}\ndata: {source: folder, path: /nonexistent}\nmethod: calibprompt+ts\n"
                    "val_shots: 2\n")
    assert validate_file(good) == []  # nothing is loaded: the data folder need not exist yet
    typed = tmp_path / "typed.yaml"
    typed.write_text("backbone: {path: 5}\ndata: {source: folder, path: /nonexistent}\n")
    assert validate_file(typed) == ["backbone.path = 5; expected a string (a name, folder, file or hub id)"]
    assert main(["config", "validate", str(good), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": True, "problems": {str(good): []}}


def test_schema_is_enforced_by_a_json_schema_validator(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to check the schema itself")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = {**{k: v for k, v in DEFAULTS.items() if k not in ("backbone", "data")},
            "backbone": {"name": "biomedclip", "precision": "fp32"}, "data": {"source": "folder", "path": "/d"},
            "method": {"name": "coop-ce+ts", "alpha": 0.1}}
    assert list(validator.iter_errors(good)) == []
    for bad in ({"train": {"epochs": "ten"}}, {"eval": {"n_bins": 0}}, {"prompt": {"position": "middel"}},
                {"shots": -3}, {"backbone": {"pth": "/x"}}, {"backbone": {"path": 5}}, {"method": "coop-xyz"},
                {"trian": {}}):
        assert list(validator.iter_errors({**good, **bad})), bad
    out = tmp_path / "calibprompt.schema.json"
    assert main(["config", "schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == schema
