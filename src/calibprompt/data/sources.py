"""``open_dataset``: the ``data:`` section of a run config -> an ``ImageDataset``.

Keys with a null value count as absent, so a config may spell out every key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .base import DataError, ImageDataset
from .classes import wordless_classnames
from .images import VERIFY_LEVELS

_COMMON = ("source", "path", "name", "classnames", "template")
_FILES = ("skip_bad", "verify")

# Valid keys per source (documented in docs/data.md).
DATA_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "folder": _COMMON + ("test_fraction",) + _FILES,
    "csv": _COMMON + ("test_fraction",) + _FILES
    + ("path_column", "label_column", "split_column", "delimiter"),
    "medmnist": _COMMON,
    "paper": _COMMON + _FILES,
}


def _openers() -> dict[str, Callable[[dict[str, Any], str], ImageDataset]]:
    from .folder import open_folder
    from .manifest import open_csv
    from .medmnist import open_medmnist
    from .paper import open_paper

    return {"folder": open_folder, "csv": open_csv, "medmnist": open_medmnist, "paper": open_paper}


def check_data_config(cfg: dict[str, Any], where: str = "data") -> dict[str, Any]:
    """Validate keys and simple types; returns the config without null values."""
    if not isinstance(cfg, dict):
        raise DataError(f"{where} must be a mapping with at least 'source' and 'path', "
                        f"got {type(cfg).__name__}")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    source = cfg.get("source")
    if source not in DATA_CONFIG_KEYS:
        raise DataError(f"{where}.source must be one of {list(DATA_CONFIG_KEYS)}, got {source!r}")
    valid = DATA_CONFIG_KEYS[source]
    for key in cfg:
        if key not in valid:
            others = [s for s, keys in DATA_CONFIG_KEYS.items() if key in keys]
            hint = f" (it applies to source {' / '.join(others)})" if others else ""
            raise DataError(f"{where}: unknown key {key!r} for source {source!r}{hint}; "
                            f"valid keys: {list(valid)}")
    if "path" not in cfg and not (source == "medmnist" and isinstance(cfg.get("name"), str)):
        raise DataError(f"{where}.path is required (a folder, manifest or .npz file, or the data root); "
                        "for source medmnist, name: <flag> alone also works (found or downloaded)")
    if "path" in cfg and not isinstance(cfg["path"], (str, os.PathLike)):
        raise DataError(f"{where}.path must be a path string, got {cfg['path']!r}")
    for key in ("name", "path_column", "label_column", "split_column", "template"):
        if key in cfg and not isinstance(cfg[key], str):
            raise DataError(f"{where}.{key} must be a string, got {cfg[key]!r}")
    if "skip_bad" in cfg and not isinstance(cfg["skip_bad"], bool):
        raise DataError(f"{where}.skip_bad must be true or false, got {cfg['skip_bad']!r}")
    if "verify" in cfg and cfg["verify"] not in VERIFY_LEVELS:
        raise DataError(f"{where}.verify must be one of {list(VERIFY_LEVELS)}, got {cfg['verify']!r}")
    if "delimiter" in cfg and (not isinstance(cfg["delimiter"], str) or len(cfg["delimiter"]) != 1):
        raise DataError(f"{where}.delimiter must be one character, got {cfg['delimiter']!r}")
    return cfg


def open_dataset(cfg: dict[str, Any], where: str = "data") -> ImageDataset:
    """Open the dataset described by a ``data:`` config section (see docs/data.md).

    Relative paths resolve against the current directory. Every image is checked when the dataset
    is opened; problems raise ``DataError`` naming the file or row (or, with ``skip_bad: true``,
    are listed in ``dataset.skipped``).
    """
    cfg = check_data_config(cfg, where)
    if "path" not in cfg:  # MedMNIST by name: $CALIBPROMPT_DATA/medmnist, the caches, else a download
        from .medmnist_files import find_medmnist

        try:
            cfg["path"] = str(find_medmnist(cfg["name"].lower()))
        except FileNotFoundError as err:
            raise DataError(str(err)) from None
    cfg["path"] = str(Path(cfg["path"]).expanduser())
    dataset = _openers()[cfg["source"]](cfg, where)
    wordless = wordless_classnames(dataset.classnames)
    if wordless:
        from calibprompt.progress import note

        note(f"{where}: dataset {dataset.name!r} has class names without words {wordless}; prompts will read "
             f"like {dataset.template.format(wordless[0])!r}, which the text tower cannot relate to the images. "
             "Give the classes names: data.classnames: [...] (or a classnames.txt)")
    if len(dataset.classnames) < 2:
        raise DataError(f"{where}: dataset {dataset.name!r} ({cfg['path']}) has {len(dataset.classnames)} class "
                        f"({dataset.classnames}); a classifier needs at least 2. Check the class folders or labels")
    return dataset


def config_for_path(path: str | os.PathLike) -> dict[str, Any]:
    """A ``data:`` section guessed from a bare path: folder, CSV/TSV manifest or MedMNIST .npz."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return {"source": "folder", "path": str(path)}
    if suffix in (".csv", ".tsv", ".tab"):
        return {"source": "csv", "path": str(path)}
    if suffix == ".npz":
        return {"source": "medmnist", "path": str(path)}
    if not path.exists():
        raise DataError(f"{path} does not exist")
    raise DataError(f"cannot tell the data source of {path}: give a folder, a .csv/.tsv manifest, "
                    "a MedMNIST .npz file or a YAML config with a data: section")
