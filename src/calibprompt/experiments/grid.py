"""Grid specs: backbones x datasets x methods x shots x seeds x hyper-parameters -> run configs.

A grid is a YAML mapping (reference and example in docs/experiments.md). Every key is checked; an
unknown key, label or parameter is an error naming the valid ones. Expansion is deterministic and
every run config is resolved (and so validated) before anything runs.

Order of the layers that make one run config (later wins)::

    run-config defaults <- base <- backbone / dataset / method sections <- shots, seed
        <- hparams (paper table or tuned.yaml) <- cells (per-cell overrides) <- sweep values

``method.<param>`` keys in ``sweep``, ``cells`` and ``hparams`` apply only to methods that take
``<param>`` (so ``sweep: {method.alpha: [...]}`` multiplies the CalibPrompt runs, not the CoOp-CE ones).

Why this module is long: it is the whole grid file format -- every key's parsing and error message,
the layering above, presets and the tuned-hyper-parameter file it reads -- kept in one place so that a
reader of a grid error finds the rule that raised it next to the others.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from calibprompt.config import ConfigError, config_hash, load_config, merge, parse_override, resolve, yaml_load

GRID_KEYS: dict[str, str] = {
    "name": "label of the grid (reports, Optuna study names); default: the file name",
    "base": "run-config fragment applied to every run (any key of a run config)",
    "backbones": "label -> backbone section, or a list of registry names",
    "datasets": "label -> data section",
    "methods": "label -> method section ({name: preset, params...}), or a list of preset names",
    "pairs": "backbone label -> dataset labels to run on it (default: every combination)",
    "shots": "int or list of ints (default: base shots, 8)",
    "n_ctx": "int or list of ints: the prompt context length (prompt.n_ctx) as an axis, for the methods that "
             "learn prompts (a variant `prompt.n_ctx=<n>` of each of their runs)",
    "seeds": "int or list of ints (default: [1, 2, 3])",
    "sweep": "dotted config key -> list of values, crossed (Cartesian product)",
    "cells": "per-cell overrides: list of {backbone, dataset, method, set: {dotted key: value}}",
    "hparams": "'paper' (the paper's alpha/lambda_as per backbone and dataset, for method calibprompt) "
               "or the tuned.yaml written by `calibprompt tune`",
}
CELL_KEYS = ("backbone", "dataset", "method", "set")
DEFAULT_SEEDS = [1, 2, 3]
#: config keys holding paths; relative ones are made absolute (against the current directory) so that
#: runs on other processes and machines (Ray) see the same files and the same config hash
PATH_KEYS = (("backbone", "path"), ("backbone", "text_dir"), ("data", "path"), ("split_file",), ("cache_dir",))
PRESET_PREFIX = "grid-"
TUNED_FORMAT = "calibprompt.tuned/1"


class GridError(ValueError):
    """A grid spec key or value is invalid."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: its config (unresolved, as ``run`` takes it), identity and labels."""

    config: dict
    config_hash: str
    backbone: str  # labels from the grid
    dataset: str
    method: str
    shots: int
    seed: int
    variant: dict = field(default_factory=dict)  # the sweep values of this run (dotted key -> value)
    #: runs with the same value may train together (``calibprompt sweep``; None: the run trains alone)
    batch_group: str | None = None

    @property
    def run_id(self) -> str:
        return self.config_hash[:16]

    @property
    def variant_key(self) -> str:
        return variant_key(self.variant)

    @property
    def title(self) -> str:
        extra = f" [{self.variant_key}]" if self.variant else ""
        return f"{self.method}{extra} · {self.backbone} · {self.dataset} · {self.shots} shots · seed {self.seed}"

    def labels(self) -> dict:
        return {"backbone": self.backbone, "dataset": self.dataset, "method": self.method,
                "shots": self.shots, "seed": self.seed, "variant": dict(self.variant)}


def batch_group(resolved: dict) -> str | None:
    """The key of the runs that may train together (see ``engine.run.run_many``): a prompt-learning method
    that can, and one backbone, data split shape, prompt layout, step count and text precision."""
    from calibprompt.methods import METHODS
    from calibprompt.settings import sha256_json

    if not getattr(METHODS[resolved["resolved_method"]["kind"]], "batchable", lambda: False)():
        return None
    tr = resolved["train"]
    return sha256_json({k: resolved.get(k) for k in ("backbone", "data", "shots", "val_shots", "split_file",
                                                      "split_by", "prompt", "device")}
                       | {"train": [tr["epochs"], tr["batch_size"], tr["drop_last"], tr.get("amp", "none")]})


def variant_key(variant: dict) -> str:
    """Canonical text of a variant: ``alpha=0.05, train.lr=0.001`` (``method.`` dropped)."""
    return ", ".join(f"{k.removeprefix('method.')}={_fmt(v)}" for k, v in sorted(variant.items()))


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


@dataclass
class Grid:
    """A validated grid spec (see module docstring); ``expand()`` gives the run specs."""

    name: str
    base: dict
    backbones: dict[str, dict]
    datasets: dict[str, dict]
    methods: dict[str, dict]
    pairs: dict[str, list[str]] | None
    shots: list[int] | None
    seeds: list[int]
    sweep: dict[str, list]
    cells: list[dict]
    hparams: str | None
    source: str = ""
    spec: dict = field(default_factory=dict)  # the spec as given (recorded in sweep.json)
    duplicates: int = 0  # runs dropped by expand() because an earlier run has the same config hash

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict, source: str = "grid", name: str | None = None) -> "Grid":
        if not isinstance(spec, dict):
            raise GridError(f"{source}: a grid spec must be a mapping of keys ({', '.join(GRID_KEYS)})")
        unknown = sorted(set(spec) - set(GRID_KEYS))
        if unknown:
            raise GridError(f"{source}: unknown grid key(s) {unknown}. Valid keys: {', '.join(GRID_KEYS)}")
        for key in ("backbones", "datasets", "methods"):
            if not spec.get(key):
                raise GridError(f"{source}: '{key}' is required ({GRID_KEYS[key]})")
        base = spec.get("base") or {}
        if not isinstance(base, dict):
            raise GridError(f"{source}: 'base' must be a mapping (a run-config fragment)")
        for key, axis in (("method", "methods"), ("shots", "shots"), ("seed", "seeds")):
            if key in base:
                raise GridError(f"{source}: base.{key} is a grid axis; use the '{axis}' key instead")
        grid = cls(
            name=str(spec.get("name") or name or "grid"),
            base=copy.deepcopy(base),
            backbones=_sections(spec["backbones"], "backbones", source, name_key="name"),
            datasets=_sections(spec["datasets"], "datasets", source, name_key=None),
            methods=_sections(spec["methods"], "methods", source, name_key="name"),
            pairs=None,
            shots=_int_list(spec["shots"], "shots", source) if spec.get("shots") is not None else None,
            seeds=_int_list(spec["seeds"], "seeds", source) if spec.get("seeds") is not None else list(DEFAULT_SEEDS),
            sweep=_sweep({**(spec.get("sweep") or {}), **_n_ctx_axis(spec, source)}, source),
            cells=[],
            hparams=spec.get("hparams"),
            source=source,
            spec=copy.deepcopy(spec),
        )
        for label, section in grid.methods.items():
            if not section.get("name"):
                raise GridError(f"{source}: methods.{label} needs a preset 'name' (see `calibprompt methods`)")
        unused = [k for k in grid.sweep if not any(_applies(k, method_params(s["name"])) for s in grid.methods.values())]
        if unused:  # checked against the grid as written, before any --only filtering
            raise GridError(f"{source}: sweep key(s) {unused} apply to none of the methods "
                            f"{[s['name'] for s in grid.methods.values()]}")
        grid.pairs = _pairs(spec.get("pairs"), grid, source)
        grid.cells = _cells(spec.get("cells") or [], grid, source)
        if grid.hparams is not None and not isinstance(grid.hparams, str):
            raise GridError(f"{source}: hparams must be 'paper' or the path of a tuned.yaml")
        if grid.hparams not in (None, "paper"):
            grid.hparams = str(Path(os.path.expandvars(grid.hparams)).expanduser().absolute())
        return grid

    @classmethod
    def load(cls, path_or_preset: str | Path) -> "Grid":
        """A grid from a YAML file, or a preset name (``paper``; see :func:`list_presets`)."""
        path = Path(path_or_preset)
        if not path.is_file():
            preset = preset_path(str(path_or_preset))
            if preset is None:
                raise GridError(f"grid {path_or_preset!r} is neither a file nor a preset "
                                f"(presets: {', '.join(list_presets()) or 'none'})")
            text, source, name = preset.read_text(), f"preset {path_or_preset}", str(path_or_preset)
        else:
            text, source, name = path.read_text(), str(path), path.stem
        try:
            spec = yaml_load(text)
        except Exception as err:  # noqa: BLE001 - any YAML error is reported with the file name
            raise GridError(f"{source}: not valid YAML: {err}") from None
        return cls.from_spec(spec or {}, source=source, name=name)

    # ---- adjustments from the command line --------------------------------------------------------
    def override(self, overrides: list[str] | None = None, seeds: list[int] | None = None,
                 shots: list[int] | None = None, only: dict[str, list[str]] | None = None,
                 n_ctx: list[int] | None = None) -> "Grid":
        """``--set`` (into base), ``--seeds``, ``--shots``, ``--n-ctx`` and ``--only axis=label,label``."""
        for item in overrides or []:
            fragment = parse_override(item)
            for key in ("method", "shots", "seed"):
                if key in fragment:
                    raise GridError(f"--set {item}: {key} is a grid axis; use --seeds/--shots or the grid file")
            _deep_merge(self.base, fragment)
        if seeds:
            self.seeds = list(seeds)
        if shots:
            self.shots = list(shots)
        if n_ctx:
            self.sweep[N_CTX_KEY] = list(n_ctx)
        for axis, labels in (only or {}).items():
            table = {"backbone": self.backbones, "dataset": self.datasets, "method": self.methods}.get(axis)
            if table is None:
                raise GridError(f"--only {axis}=...: the axis must be backbone, dataset or method")
            missing = [x for x in labels if x not in table]
            if missing:
                raise GridError(f"--only {axis}: unknown label(s) {missing}; the grid has {list(table)}")
            for label in list(table):
                if label not in labels:
                    del table[label]
        return self

    # ---- expansion --------------------------------------------------------------------------------
    def combos(self) -> list[tuple[str, str]]:
        """(backbone label, dataset label) pairs to run."""
        out = []
        for b in self.backbones:
            for d in self.datasets:
                if self.pairs is None or d in self.pairs.get(b, []):
                    out.append((b, d))
        return out

    def cell_config(self, backbone: str, dataset: str, method_section: dict, shots: int | None,
                    seed: int, method_label: str | None = None, variant: dict | None = None,
                    apply_hparams: bool = True) -> dict:
        """The (unresolved) run config of one cell; raises GridError/ConfigError on invalid keys."""
        where = f"{self.source}: {method_label or method_section.get('name')} · {backbone} · {dataset}"
        try:
            cfg = load_config(None, base=_absolute_paths(self.base))
            merge(cfg, {"backbone": _absolute_paths({"backbone": self.backbones[backbone]})["backbone"]},
                  source=f"{where} (backbones.{backbone})")
            merge(cfg, {"data": _absolute_paths({"data": self.datasets[dataset]})["data"]},
                  source=f"{where} (datasets.{dataset})")
            cfg["method"] = copy.deepcopy(method_section)
            if shots is not None:
                cfg["shots"] = shots
            cfg["seed"] = seed
            accepted = method_params(method_section["name"])
            base_name = method_section["name"].split("+")[0].strip().lower()
            layers: list[tuple[str, dict]] = []
            if apply_hparams:
                layers += [(f"hparams {self.hparams}", self._hparams(backbone, dataset, base_name))]
            for i, cell in enumerate(self.cells):
                if backbone in cell["backbone"] and dataset in cell["dataset"] and (
                        method_label in cell["method"] if method_label is not None else not cell["explicit_method"]):
                    layers.append((f"cells[{i}]", _applicable(cell["set"], accepted, explicit=cell["explicit_method"],
                                                             where=f"{self.source}: cells[{i}]")))
            if variant:
                layers.append(("sweep", variant))
            for source, values in layers:
                for key, value in values.items():
                    merge(cfg, _absolute_paths(_nested(key, value)), source=f"{where} ({source}: {key})")
        except ConfigError as err:
            raise GridError(str(err)) from None
        cfg["name"] = " · ".join(x for x in (method_label or method_section["name"], backbone, dataset) if x)
        return cfg

    def expand(self) -> list[RunSpec]:
        """Every run of the grid, in a fixed order (backbone, dataset, method, shots, variant, seed)."""
        specs: list[RunSpec] = []
        seen: set[str] = set()
        self.duplicates = 0
        shots_axis = self.shots or [None]
        for backbone, dataset in self.combos():
            for label, section in self.methods.items():
                accepted = method_params(section["name"])
                keys = [k for k in self.sweep if _applies(k, accepted)]
                for shots in shots_axis:
                    for values in itertools.product(*(self.sweep[k] for k in keys)):
                        variant = dict(zip(keys, values))
                        for seed in self.seeds:
                            cfg = self.cell_config(backbone, dataset, section, shots, seed, label, variant)
                            try:
                                resolved = resolve(cfg)
                            except (ConfigError, ValueError) as err:
                                raise GridError(f"{self.source}: run {label} · {backbone} · {dataset} "
                                                f"(seed {seed}{', ' + variant_key(variant) if variant else ''}): "
                                                f"{err}") from None
                            digest = config_hash(resolved)
                            if digest in seen:
                                self.duplicates += 1
                                continue
                            seen.add(digest)
                            specs.append(RunSpec(cfg, digest, backbone, dataset, label, int(resolved["shots"]),
                                                 seed, variant, batch_group(resolved)))
        return specs

    # ---- hyper-parameter tables -------------------------------------------------------------------
    def _hparams(self, backbone: str, dataset: str, method_base: str) -> dict:
        if self.hparams is None:
            return {}
        if self.hparams == "paper":
            if method_base != "calibprompt":
                return {}
            from calibprompt.methods import paper_hparams

            names_b = [self.backbones[backbone].get("name"), backbone]
            names_d = [self.datasets[dataset].get("name"), dataset]
            errors = []
            for b, d in itertools.product(names_b, names_d):
                if b and d:
                    try:
                        return {f"method.{k}": v for k, v in paper_hparams(str(b), str(d)).items()}
                    except ValueError as err:
                        errors.append(str(err))
            raise GridError(f"{self.source}: hparams: paper has no values for backbone {backbone!r} on "
                            f"dataset {dataset!r}. {errors[-1] if errors else ''}")
        table = load_tuned(self.hparams)
        if method_base != table["method"].split("+")[0]:
            return {}
        for cell in table["cells"]:
            if cell["backbone"] == backbone and cell["dataset"] == dataset:
                return dict(cell["set"])
        return {}

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "backbones": list(self.backbones),
                "datasets": list(self.datasets), "methods": list(self.methods), "shots": self.shots,
                "seeds": self.seeds, "sweep": self.sweep, "pairs": self.pairs, "hparams": self.hparams}


# ---------------------------------------------------------------------------------------------- helpers
def method_params(name: str) -> set[str]:
    """Parameter names the method preset ``name`` accepts."""
    from calibprompt.methods import METHODS, resolve_method

    try:
        spec = resolve_method(name)
    except ValueError as err:
        raise GridError(str(err)) from None
    # a marker, not a parameter: the method learns prompts, so the n_ctx axis applies to it
    return set(spec.params) | ({"n_ctx_axis"} if hasattr(METHODS[spec.kind], "from_prompt") else set())


def _applies(key: str, accepted: set[str]) -> bool:
    if key == N_CTX_KEY:  # context vectors exist only for prompt-learning methods
        return "n_ctx_axis" in accepted
    return not key.startswith("method.") or key.split(".", 1)[1] in accepted


N_CTX_KEY = "prompt.n_ctx"


def _n_ctx_axis(spec: dict, source: str) -> dict:
    """The ``n_ctx`` grid key as the sweep entry it stands for."""
    if spec.get("n_ctx") is None:
        return {}
    if N_CTX_KEY in (spec.get("sweep") or {}):
        raise GridError(f"{source}: give the context length either as n_ctx or as sweep: {{{N_CTX_KEY}: ...}}, not both")
    return {N_CTX_KEY: _int_list(spec["n_ctx"], "n_ctx", source)}


def _applicable(values: dict, accepted: set[str], explicit: bool, where: str) -> dict:
    out = {}
    for key, value in values.items():
        if _applies(key, accepted):
            out[key] = value
        elif explicit:
            raise GridError(f"{where}: {key} is not a parameter of this method (it takes "
                            f"{sorted(accepted - {'n_ctx_axis'}) or 'none'})")
    return out


def _nested(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)
    return out


def _deep_merge(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_merge(target[key], value)
        else:
            target[key] = value


def _absolute_paths(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for keys in PATH_KEYS:
        node = cfg
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and node[keys[-1]]:
            value = os.path.expandvars(node[keys[-1]])
            unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value)
            if unset:
                raise GridError(f"{'.'.join(keys)}: {node[keys[-1]]!r} uses the unset environment variable(s) "
                                f"{', '.join(unset)}; set them or override the path (e.g. --set {'.'.join(keys)}=...)")
            node[keys[-1]] = value if "://" in value else str(Path(value).expanduser().absolute())
    return cfg


def _sections(value: Any, key: str, source: str, name_key: str | None) -> dict[str, dict]:
    if isinstance(value, list):
        if name_key is None:
            raise GridError(f"{source}: '{key}' must be a mapping of label -> section")
        out = {}
        for item in value:
            if isinstance(item, str):
                label, section = item, {name_key: item}
            elif isinstance(item, dict) and isinstance(item.get(name_key), str):
                label, section = item[name_key], copy.deepcopy(item)
            else:
                raise GridError(f"{source}: each item of '{key}' must be a name or a mapping with '{name_key}'")
            if label in out:
                raise GridError(f"{source}: '{key}' lists {label!r} twice; use the mapping form "
                                "(label: section) to give two entries different labels")
            out[label] = section
        return out
    if isinstance(value, dict):
        out = {}
        for label, section in value.items():
            if section is None and name_key:
                section = {name_key: label}
            if isinstance(section, str) and name_key:
                section = {name_key: section}
            if not isinstance(section, dict):
                raise GridError(f"{source}: {key}.{label} must be a mapping (a {key[:-1]} section)")
            out[str(label)] = copy.deepcopy(section)
        return out
    raise GridError(f"{source}: '{key}' must be a mapping of label -> section")


def _int_list(value: Any, key: str, source: str) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise GridError(f"{source}: '{key}' must be an integer or a list of integers, got {value!r}")
    if len(set(items)) != len(items):
        raise GridError(f"{source}: '{key}' lists a value twice: {value!r}")
    return list(items)


def _sweep(value: Any, source: str) -> dict[str, list]:
    if not isinstance(value, dict):
        raise GridError(f"{source}: 'sweep' must map dotted config keys to lists of values")
    out = {}
    for key, values in value.items():
        if not isinstance(values, list) or not values:
            raise GridError(f"{source}: sweep.{key} must be a non-empty list of values (a single value "
                            "belongs in 'base')")
        if key.split(".")[0] in ("shots", "seed", "backbone", "data") or key == "method.name":
            raise GridError(f"{source}: sweep.{key}: use the grid axes (backbones, datasets, methods, "
                            "shots, seeds) for this")
        out[str(key)] = list(values)
    return out


def _labels(value: Any, table: dict, what: str, where: str) -> list[str]:
    if value is None:
        return list(table)
    items = value if isinstance(value, list) else [value]
    missing = [x for x in items if x not in table]
    if missing:
        raise GridError(f"{where}: unknown {what} label(s) {missing}; the grid has {list(table)}")
    return [str(x) for x in items]


def _pairs(value: Any, grid: Grid, source: str) -> dict[str, list[str]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GridError(f"{source}: 'pairs' must map backbone labels to lists of dataset labels")
    out = {}
    for b, ds in value.items():
        _labels(b, grid.backbones, "backbone", f"{source}: pairs")
        out[str(b)] = _labels(ds, grid.datasets, "dataset", f"{source}: pairs.{b}")
    return out


def _cells(value: Any, grid: Grid, source: str) -> list[dict]:
    if not isinstance(value, list):
        raise GridError(f"{source}: 'cells' must be a list of {{backbone, dataset, method, set}} entries")
    out = []
    for i, cell in enumerate(value):
        where = f"{source}: cells[{i}]"
        if not isinstance(cell, dict):
            raise GridError(f"{where} must be a mapping with keys {CELL_KEYS}")
        unknown = sorted(set(cell) - set(CELL_KEYS))
        if unknown:
            raise GridError(f"{where}: unknown key(s) {unknown}; valid keys: {list(CELL_KEYS)}")
        values = cell.get("set")
        if not isinstance(values, dict) or not values:
            raise GridError(f"{where}: 'set' must map dotted config keys to values")
        for key in values:
            if key.split(".")[0] in ("shots", "seed") or key == "method.name":
                raise GridError(f"{where}: set.{key} is a grid axis and cannot be overridden per cell")
        out.append({
            "backbone": _labels(cell.get("backbone"), grid.backbones, "backbone", where),
            "dataset": _labels(cell.get("dataset"), grid.datasets, "dataset", where),
            "method": _labels(cell.get("method"), grid.methods, "method", where),
            "explicit_method": cell.get("method") is not None,
            "set": dict(values),
        })
    return out


# ---------------------------------------------------------------------------------------------- presets
def _configs_dir():
    return resources.files("calibprompt") / "configs"


def list_presets() -> list[str]:
    try:
        return sorted(p.name[len(PRESET_PREFIX):-5] for p in _configs_dir().iterdir()
                      if p.name.startswith(PRESET_PREFIX) and p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def preset_path(name: str):
    candidate = _configs_dir() / f"{PRESET_PREFIX}{name}.yaml"
    return candidate if candidate.is_file() else None


# ---------------------------------------------------------------------------------------------- tuned
def load_tuned(path: str | Path) -> dict:
    """A tuned.yaml written by ``calibprompt tune``: {format, method, objective, cells: [...]}"""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"hparams: {path} does not exist (write it with `calibprompt tune`, or use 'paper')")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT or not isinstance(data.get("cells"), list):
        raise GridError(f"hparams: {path} is not a tuned.yaml written by `calibprompt tune` (format {TUNED_FORMAT})")
    for cell in data["cells"]:
        if not {"backbone", "dataset", "set"} <= set(cell):
            raise GridError(f"hparams: {path}: each cell needs backbone, dataset and set")
    return data
