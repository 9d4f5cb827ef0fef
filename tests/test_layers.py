"""The package's layering: every module imports only modules of its own or earlier layers (the data flow
of docs/design.md), no import cycles among module-level imports, and no module over 400 lines without a
reason in its docstring."""

from __future__ import annotations

import ast
from pathlib import Path

import calibprompt

ROOT = Path(calibprompt.__file__).parent
#: data flow order (docs/design.md); a module may import from its own layer or any earlier one
LAYERS = ["settings", "progress", "plugins", "data", "backbones", "features", "losses", "calibration", "methods", "metrics", "config",
          "engine", "robustness", "experiments", "reporting", "deploy", "pretrain", "demo", "cli"]
TOP = {"__init__", "__main__"}  # the package's entry points may import anything


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(["calibprompt", *parts])] = path
    return out


def _layer(module: str) -> str:
    return module.split(".")[1]


def _imports(module: str, path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("calibprompt.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("calibprompt.") or name == "calibprompt":
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}
    return found


def test_every_module_imports_only_its_own_or_earlier_layers():
    modules = _modules()
    bad = []
    for module, path in modules.items():
        if module == "calibprompt" or _layer(module) in TOP:
            continue
        own = LAYERS.index(_layer(module))
        for name in _imports(module, path):
            if name == "calibprompt" or name.count(".") < 1:
                continue
            target = _layer(name)
            if target in TOP:
                target_ok = name in ("calibprompt.__version__",)
                if not target_ok:
                    bad.append(f"{module} -> {name}")
                continue
            if target not in LAYERS:
                continue  # e.g. calibprompt.__version__ handled above
            if LAYERS.index(target) > own:
                bad.append(f"{module} ({_layer(module)}) -> {name} ({target})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_every_top_level_subpackage_has_a_layer():
    names = {_layer(m) for m in _modules() if m != "calibprompt"}
    assert names - set(LAYERS) <= TOP | {"configs"}, sorted(names - set(LAYERS))


def test_no_import_cycles_among_module_level_imports():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(module, path, top_level_only=True):
            while name and name not in modules:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                # a package importing its own submodules (and they importing siblings) is not a cycle of layers
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(nxt) or nxt.startswith(c) for c in cycle):
                    cycles.append(" -> ".join(cycle))
            elif state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in graph:
        if state.get(module) is None:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_long_modules_state_why():
    long = []
    for module, path in _modules().items():
        n = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if n > 400 and "Why this module is long" not in doc:
            long.append(f"{module}: {n} lines")
    assert not long, "modules over 400 lines without a reason in their docstring:\n" + "\n".join(long)


def test_curated_api_names_resolve_and_stay_small():
    import calibprompt as cp

    assert cp.__version__ and 10 <= len(cp.__all__) <= 25
    for name in cp.__all__:
        assert getattr(cp, name) is not None, name
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cp.nope  # noqa: B018
