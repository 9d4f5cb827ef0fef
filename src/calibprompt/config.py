"""Run configuration: strict loading, ``--set`` overrides, resolution and the run identity hash.

A config is a YAML mapping. Closed sections (``prompt``, ``train``, ``eval``) and top-level keys are
checked here; open sections (``backbone``, ``data``, ``method`` parameters) are checked by the code that
consumes them. Any unknown key is an error naming the key and the valid ones.

The run identity is the sha256 of the *resolved* config (method expanded into its losses, defaults
filled in) without the keys that cannot change results (``device`` placement aside, which is recorded
but not hashed, and ``cache_dir``). A finished run is reused only when this hash matches.

Why this module is long: one table of keys (``DEFAULTS`` and ``SCHEMA``) has four readers that stay
beside it: loading with ``--set``, the type and range checks, ``validate_file`` (``calibprompt config
validate``) and ``json_schema`` (``calibprompt config schema``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from calibprompt.settings import sha256_json

DEFAULTS: dict[str, Any] = {
    "name": None,  # free label shown in reports
    "seed": 1,
    "shots": 8,
    "val_shots": 0,  # held-out shots per class for post-hoc calibration / tuning (disjoint from train)
    "split_by": "pixels",  # rank images for the shots by their decoded pixels, or "bytes" (calibprompt 0.1)
    "split_file": None,  # reuse a saved few-shot split (JSON)
    "backbone": {},
    "data": {},
    "method": {"name": "calibprompt"},  # preset name plus its parameters (see `calibprompt methods`)
    "losses": None,  # explicit loss list; only with method name "custom"
    "posthoc": None,  # post-hoc calibrator fitted on the validation shots ("ts", "vs", "hb", "iso")
    "head_from": None,  # a saved head (or CoOp prompt) file to evaluate instead of fitting (set by `eval`)
    "prompt": {"n_ctx": 16, "init": None, "position": "end", "csc": False, "init_std": 0.02},
    "train": {
        "epochs": 50, "batch_size": 16, "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4,
        "warmup_epochs": 1, "warmup_lr": None,  # None: the backbone's preset (1e-3 MedCLIP, else 1e-5)
        "optimizer": "sgd", "drop_last": True,
        "n_views": None,  # augmented views per training image; None = one per epoch (as the paper)
        "augment": True,  # False: every epoch uses the test transform (no crop/flip)
        "aug_seed": 0,
        "shared_prefix": True,  # causal text towers compute [SOT, ctx] once per step (docs/performance.md §8)
        "amp": "none",  # mixed precision of the text pass: bf16, fp16 (loss-scaled) or none (docs/performance.md §11)
    },
    # bootstrap: resamples of the test images for the 95% intervals of ECE and accuracy (0: none)
    "eval": {"n_bins": 10, "batch_size": 100, "bootstrap": 1000},
    "device": "cpu",  # "cpu", "cuda", "cuda:N" or "auto"
    "cache_dir": None,  # feature cache root; None = $CALIBPROMPT_CACHE or ~/.cache/calibprompt
    # image encoding: processes decoding images beside the encoder (0 = in its thread; "auto" decides
    # from the first batch) and images per encoder batch (docs/performance.md)
    "encode": {"workers": "auto", "batch_size": 32, "amp": "none"},
    # decisions fitted on the validation shots after the post-hoc calibrator (docs/deploy.md): split
    # conformal prediction sets at level alpha (null: off), and abstention for a target risk (null: off)
    "conformal": {"alpha": None, "score": "aps", "lambda": 0.001, "k_reg": 1, "randomized": True, "by_class": False},
    "selective": {"target_risk": None},
    # a mirror of finished runs in TensorBoard (event files in the run folder) and MLflow (a tracking URI)
    "tracking": {"tensorboard": False, "mlflow": None, "experiment": None},
}
OFF_WHEN_NULL = {"conformal": "alpha", "selective": "target_risk"}  # left out of the run identity while off
OPEN_SECTIONS = ("backbone", "data", "method")
NOT_HASHED = ("device", "cache_dir", "name", "encode", "eval.bootstrap", "tracking",
              "train.shared_prefix",  # the shared-prefix pass equals the full one within 1e-5
              "train.amp")  # none of them changes a result, except amp: hashed below when it is on
AMP_KEYS = ("encode.amp", "train.amp")


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that also reads ``1e-3`` as a float (PyYAML's YAML 1.1 rules need ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$"),
    list("-+0123456789."),
)


def yaml_load(text: str, source: str = "YAML"):
    """Safe YAML (no Python tags). Syntax errors and unsafe tags are a ConfigError naming the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML for calibprompt ({what}); only plain YAML values are "
                          "allowed (no !!python tags)") from None


class ConfigError(ValueError):
    """A config key or value is invalid."""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> dict:
    """Defaults <- YAML file <- ``base`` dict <- ``--set key=value`` overrides, validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml_load(path.read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        loaded.pop("resolved_method", None)  # derived by resolve(); present in a run's own config.yaml
        merge(cfg, loaded, source=str(path))
    if base:
        merge(cfg, base, source="config")
    for item in overrides or []:
        merge(cfg, parse_override(item), source=f"--set {item}")
    return cfg


def parse_override(item: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    value = yaml_load(raw) if raw != "" else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(cfg: dict, update: dict, source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``cfg`` in place, rejecting unknown keys of closed sections."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in cfg and not _is_open(prefix):
            valid = ", ".join(sorted(cfg))
            raise ConfigError(f"{source}: unknown config key '{dotted}'. Valid keys here: {valid}")
        if isinstance(cfg.get(key), dict) and isinstance(value, dict):
            if key == "method" and "name" in value and value["name"] != cfg[key].get("name"):
                cfg[key] = {}  # a new method: drop the previous method's parameters
            merge(cfg[key], value, source, prefix=f"{dotted}.")
        elif key == "method" and isinstance(value, str):
            cfg[key] = {"name": value}
        else:
            cfg[key] = value


def _is_open(prefix: str) -> bool:
    return prefix.split(".")[0] in OPEN_SECTIONS if prefix else False


#: type and range of every key of the closed sections: (kind, low, high); kind is "int", "float", "bool",
#: "str" or a tuple of choices; a low bound written as "(0" excludes it; null only where the default is
SCHEMA: dict[str, tuple] = {
    "seed": ("int", 0, None), "shots": ("int", 1, None), "val_shots": ("int", 0, None),
    "split_by": (("pixels", "bytes"), None, None),
    "prompt.n_ctx": ("int", 1, None), "prompt.init": ("str", None, None),
    "prompt.position": (("end", "middle", "front"), None, None), "prompt.csc": ("bool", None, None),
    "prompt.init_std": ("float", "(0", None),
    "train.epochs": ("int", 1, None), "train.batch_size": ("int", 1, None), "train.lr": ("float", "(0", None),
    "train.momentum": ("float", 0, 1), "train.weight_decay": ("float", 0, None),
    "train.warmup_epochs": ("int", 0, None), "train.warmup_lr": ("float", 0, None),
    "train.optimizer": (("sgd", "adam"), None, None), "train.drop_last": ("bool", None, None),
    "train.n_views": ("int", 1, None), "train.augment": ("bool", None, None), "train.aug_seed": ("int", 0, None),
    "train.shared_prefix": ("bool", None, None), "train.amp": (("none", "bf16", "fp16"), None, None),
    "eval.n_bins": ("int", 1, None), "eval.batch_size": ("int", 1, None), "eval.bootstrap": ("int", 0, None), "encode.batch_size": ("int", 1, None),
    "encode.amp": (("none", "bf16", "fp16"), None, None),
    "conformal.alpha": ("float", "(0", 0.99), "conformal.score": (("lac", "aps", "raps"), None, None),
    "conformal.lambda": ("float", 0, None), "conformal.k_reg": ("int", 0, None), "conformal.randomized": ("bool", None, None),
    "conformal.by_class": ("bool", None, None),
    "selective.target_risk": ("float", 0, 0.99),
    "device": ("str", None, None), "name": ("str", None, None),
    "tracking.tensorboard": ("bool", None, None), "tracking.mlflow": ("str", None, None),
    "tracking.experiment": ("str", None, None),
}
_KINDS = {"int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
          "bool": ("true or false", lambda v: isinstance(v, bool)), "str": ("a string", lambda v: isinstance(v, str))}


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_types(cfg: dict) -> None:
    """Every closed-section value has its type and range, else one ConfigError naming each bad key.
    Integers are integers: ``shots: 2.5`` or ``epochs: ten`` are errors, never silently truncated."""
    problems = type_problems(cfg)
    if problems:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(problems))


def type_problems(cfg: dict) -> list[str]:
    """One line per closed-section key whose value has the wrong type or range ("key: why")."""
    problems = []
    for dotted, (kind, low, high) in SCHEMA.items():
        value = _lookup(cfg, dotted)
        if value is None:
            if _lookup(DEFAULTS, dotted) is not None:
                problems.append(f"{dotted}: null is not allowed (default {_lookup(DEFAULTS, dotted)!r})")
        elif isinstance(kind, tuple):
            if value not in kind:
                problems.append(f"{dotted}: {value!r} is not one of {', '.join(map(repr, kind))}")
        elif not _KINDS[kind][1](value):
            problems.append(f"{dotted}: {value!r} is not {_KINDS[kind][0]}")
        elif low is not None or high is not None:
            above = low is None or (value > float(low[1:]) if isinstance(low, str) else value >= low)
            if not above or (high is not None and value > high):
                bound = (f"> {low[1:]}" if isinstance(low, str) else f">= {low}") if low is not None else ""
                if high is not None:
                    bound += (" and " if bound else "") + f"<= {high}"
                problems.append(f"{dotted}: {value!r} is out of range (must be {bound})")
    workers = _lookup(cfg, "encode.workers")
    if workers != "auto" and not (_KINDS["int"][1](workers) and workers >= 0):
        problems.append(f"encode.workers: {workers!r} is not a whole number >= 0 or 'auto'")
    return problems


def validate_file(path: str | Path) -> list[str]:
    """Every problem of a run config file, one line each naming the key (empty: valid). Reads no data
    and loads no model: types and ranges of every key first, then what resolution checks (method,
    losses, backbone and data keys)."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        return [str(err)]
    from calibprompt.backbones.registry import check_backbone_config
    from calibprompt.data import check_data_config

    from calibprompt.methods import resolve_method

    problems = type_problems(cfg)
    for check, section in ((check_backbone_config, "backbone"), (check_data_config, "data")):
        if not isinstance(cfg[section], dict):
            problems.append(f"{section}: must be a mapping of keys to values, got {cfg[section]!r}")
            continue
        try:
            check(cfg[section])
        except ValueError as err:
            problems.append(str(err) if str(err).startswith(section) else f"{section}: {err}")
    method = dict(cfg["method"]) if isinstance(cfg["method"], dict) else {}
    name = method.pop("name", None)
    if name and name != "custom":  # the method and its parameters, whatever else is wrong
        try:
            resolve_method(name, **method)
        except ValueError as err:
            problems.append(f"method: {err}")
    if not problems:
        try:
            resolve(cfg)
        except ValueError as err:  # ConfigError, and the data and backbone checks' own errors
            problems.append(str(err))
    return problems


def json_schema() -> dict:
    """A JSON Schema (draft 2020-12) of a run config, for editors and other tools."""
    from calibprompt.backbones.registry import _CHOICES, BACKBONE_KEYS, STRING_KEYS
    from calibprompt.data.sources import DATA_CONFIG_KEYS
    from calibprompt.methods import list_methods

    types = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}

    def field(dotted: str, kind, low, high) -> dict:
        node: dict = {"enum": list(kind)} if isinstance(kind, tuple) else {"type": types[kind]}
        if isinstance(low, str):
            node["exclusiveMinimum"] = float(low[1:])
        elif low is not None:
            node["minimum"] = low
        if high is not None:
            node["maximum"] = high
        default = _lookup(DEFAULTS, dotted)
        if default is None:
            node = {"anyOf": [node, {"type": "null"}]}
        node["default"] = default
        return node

    def section(**properties) -> dict:
        return {"type": "object", "additionalProperties": False, "properties": properties}

    root = section()
    for dotted, (kind, low, high) in SCHEMA.items():
        node, parts = root, dotted.split(".")
        for part in parts[:-1]:
            node = node["properties"].setdefault(part, section())
        node["properties"][parts[-1]] = field(dotted, kind, low, high)
    root["properties"]["encode"]["properties"]["workers"] = {
        "anyOf": [{"type": "integer", "minimum": 0}, {"const": "auto"}], "default": "auto"}
    root["properties"]["backbone"] = section(**{
        key: {"description": text, **({"enum": list(_CHOICES[key])} if key in _CHOICES else {}),
              **({"type": "string"} if key in STRING_KEYS else {})}
        for key, text in BACKBONE_KEYS.items()})
    data_keys = sorted({k for keys in DATA_CONFIG_KEYS.values() for k in keys})
    root["properties"]["data"] = {**section(**{k: {} for k in data_keys}), "required": ["source"]}
    root["properties"]["data"]["properties"]["source"] = {"enum": list(DATA_CONFIG_KEYS)}
    from calibprompt.methods import posthoc_suffixes

    names = "|".join(re.escape(m["name"]) for m in list_methods()) + "|custom"
    name = {"type": "string", "pattern": f"^({names})(\\+({'|'.join(map(re.escape, posthoc_suffixes()))}))?$"}
    root["properties"]["method"] = {"anyOf": [
        name, {"type": "object", "properties": {"name": name}, "required": ["name"]}]}
    for key in ("losses", "posthoc", "split_file", "head_from", "cache_dir"):
        root["properties"][key] = {}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "calibprompt run config",
            **root}


def resolve(cfg: dict) -> dict:
    """Fill in what the config leaves to presets: the method's losses and post-hoc step, and the
    backbone's warm-up lr. Every key is checked here, before any data or model is loaded. The result is
    what gets hashed and recorded."""
    from dataclasses import replace

    from calibprompt.methods import posthoc_suffixes, resolve_method
    from calibprompt.methods.presets import normalise_losses

    check_types(cfg)
    out = copy.deepcopy(cfg)
    method = dict(out["method"])
    name = method.pop("name", None)
    if not name:
        raise ConfigError("method.name is required, e.g. method: {name: calibprompt, alpha: 0.1}")
    try:
        if name == "custom":
            if method:
                raise ConfigError(f"method 'custom' takes no parameters ({', '.join(method)}); put them in `losses:`")
            if not out.get("losses"):
                raise ConfigError("method 'custom' needs a `losses:` list of {name, weight, ...} entries")
            spec = resolve_method("coop-ce")  # the CoOp prompt learner, with the config's own loss list
            losses = normalise_losses(out["losses"], "losses")
            spec = replace(spec, name="custom", losses=losses, description="custom loss list")
        else:
            if out.get("losses"):
                raise ConfigError("`losses:` is only used with method name 'custom'; remove it or set method.name: "
                                  "custom (feature-space methods take method.losses)")
            spec = resolve_method(name, **method)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if out["posthoc"]:
        if out["posthoc"] not in posthoc_suffixes():
            raise ConfigError(f"posthoc {out['posthoc']!r} is not a post-hoc calibrator; valid: "
                              f"{', '.join(posthoc_suffixes())}")
        if spec.posthoc and out["posthoc"] != spec.posthoc:
            raise ConfigError(f"posthoc {out['posthoc']!r} conflicts with method {name!r} ({spec.posthoc!r})")
        spec = replace(spec, posthoc=out["posthoc"])
    out["resolved_method"] = spec.as_config()
    if out["resolved_method"]["posthoc"] and int(out["val_shots"]) < 1 and not out.get("split_file"):
        raise ConfigError(
            f"post-hoc calibrator {out['resolved_method']['posthoc']!r} is fitted on validation shots: "
            "set val_shots (e.g. val_shots: 4)"
        )
    if spec.build().needs_validation() and int(out["val_shots"]) < 1 and not out.get("split_file"):
        raise ConfigError(f"method {spec.name!r} selects its hyper-parameters on validation shots: set val_shots "
                          "(e.g. val_shots: 4) or give the parameter explicitly (e.g. method.C for linear-probe)")
    for section, key in OFF_WHEN_NULL.items():
        if out[section][key] is not None and int(out["val_shots"]) < 1 and not out.get("split_file"):
            raise ConfigError(f"{section}.{key} is set, and {section} decisions are fitted on the validation shots: "
                              "set val_shots (conformal sets at alpha need at least 1/alpha - 1 of them in all)")
    from calibprompt.data import check_data_config

    check_data_config(out["data"])  # unknown data keys fail before any model is loaded
    from calibprompt.backbones.registry import check_backbone_config

    try:
        check_backbone_config(out["backbone"])  # so do unknown backbone keys and values
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_tracking(out.get("tracking"))
    if out["train"]["warmup_lr"] is None:
        out["train"]["warmup_lr"] = backbone_default(out["backbone"], "warmup_lr", 1e-5)
    return out


def check_tracking(tracking: dict | None) -> None:
    """ConfigError before any work when a tracking target's package is missing (engine/tracking.py)."""
    import importlib.util

    extra = "pip install 'calibprompt[tracking]'"
    if (tracking or {}).get("tensorboard") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"tracking.tensorboard needs the tensorboard package: {extra}")
    if (tracking or {}).get("mlflow") and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"tracking.mlflow needs MLflow: {extra} (or pip install mlflow-skinny)")


def backbone_default(backbone_cfg: dict, key: str, fallback: Any) -> Any:
    """A registry default for the configured backbone (e.g. MedCLIP's warm-up lr 1e-3)."""
    from calibprompt.backbones import list_backbones

    name = backbone_cfg.get("name")
    for entry in list_backbones():
        if entry.get("name") == name and entry.get(key) is not None:
            return entry[key]
    return fallback


def config_hash(resolved: dict) -> str:
    """Identity of a run: sha256 of the resolved config minus keys that cannot change its results."""
    # a decision section that is off is left out, so adding one to calibprompt kept older runs' identity
    kept = {k: v for k, v in resolved.items() if k not in NOT_HASHED
            and not (k in OFF_WHEN_NULL and (v or {}).get(OFF_WHEN_NULL[k]) is None)}
    for dotted in NOT_HASHED:  # a key inside a section ("eval.bootstrap")
        section, _, key = dotted.partition(".")
        if key and isinstance(kept.get(section), dict):
            kept[section] = {k: v for k, v in kept[section].items() if k != key}
    for dotted in AMP_KEYS:  # mixed precision gives other numbers: another run (fp32 runs keep their identity)
        section, _, key = dotted.partition(".")
        amp = (resolved.get(section) or {}).get(key, "none")
        if amp != "none":
            kept[dotted] = amp
    return sha256_json(kept)


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
