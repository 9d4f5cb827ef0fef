"""Dependencies match the code: every third-party module the package imports is declared (a dependency
or an extra), the floors the code needs are the declared ones, and extras pull what is used."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import calibprompt

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """distribution name -> where it is declared ("dependencies" or the extra's name)."""
    out = {_name(r): "dependencies" for r in PROJECT["dependencies"]}
    for extra, reqs in PROJECT["optional-dependencies"].items():
        for r in reqs:
            out.setdefault(_name(r), extra)
    return out


def _imported_modules() -> set[str]:
    found = set()
    for path in Path(calibprompt.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"calibprompt", "__future__"}


def test_every_imported_module_is_declared():
    dists = packages_distributions()
    declared = _declared()
    missing = []
    for module in sorted(_imported_modules()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [])}
        if names and not names & set(declared):
            missing.append(f"{module} (from {', '.join(sorted(names))})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_floors_the_code_needs():
    deps = {_name(r): r for r in PROJECT["dependencies"]}
    assert re.search(r">=\s*3\.", deps["pydicom"]), "data/images.py imports pydicom.pixels (pydicom 3.0+)"
    for name in ("huggingface-hub", "filelock"):
        assert name in deps, f"{name} is imported by the package and must be a dependency"


def test_extras_pull_what_is_used():
    extras = PROJECT["optional-dependencies"]
    (ray,) = extras["ray"]
    assert _name(ray) == "ray" and "[client]" in ray and "default" not in ray  # the dashboard is off
    assert {_name(r) for r in extras["dicom"]} >= {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"}
    assert {_name(r) for r in extras["tracking"]} == {"tensorboard", "mlflow-skinny"}
    assert any(r.startswith("calibprompt[") and all(e in r for e in ("ray", "dicom", "tracking"))
               for r in extras["test"])


def test_lowest_versions_file_pins_every_floor():
    pinned = {}
    for line in (ROOT / "constraints-min.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[_name(name)] = version.strip()
    for requirement in PROJECT["dependencies"]:
        name = _name(requirement)
        floor = re.search(r">=\s*([\w.]+)", requirement).group(1)
        assert name in pinned, f"{name} is not in constraints-min.txt"
        if name not in ("torch", "torchvision"):  # only the local wheels install here (docs/ecosystem.md)
            assert _release(pinned[name]) == _release(floor), (name, floor, pinned[name])


def _release(version: str) -> tuple[int, ...]:
    """(1, 24, 0) for "1.24", "1.24.0": trailing zeros do not make another version."""
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)
