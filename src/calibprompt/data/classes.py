"""Class names and zero-shot templates: ``classnames.txt`` files, the ``classnames:`` override and
the per-dataset template lookup (docs/method.md §7.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import DataError, check_template

DEFAULT_TEMPLATE = "An image of {}."

# Official lookup by dataset name (tools/zsclip_encoder.py); we also accept the short names and
# folder names, case-insensitively.
_TEMPLATES = {
    "digestpath": "An H&E image patch of {} tissue.",
    "pannuke": "An H&E image patch of {} skin tissue.",
    "covid": "A chest X-ray image of {} patient",
    "rsna18": "A chest X-ray image of {} patient",
    "kather": "An H&E image of {}.",
    "kathercolon": "An H&E image of {}.",
}


def default_template(name: str) -> str:
    """The paper's template for a paper dataset name, else "An image of {}."."""
    return _TEMPLATES.get(str(name).lower(), DEFAULT_TEMPLATE)


def choose_template(cfg_template: Any, name: str, where: str) -> str:
    if cfg_template is None:
        return default_template(name)
    return check_template(cfg_template, where)


def prompt_text(key: str) -> str:
    """Folder or label name -> prompt text (underscores become spaces, as in the official loaders)."""
    return str(key).replace("_", " ").strip()


def read_classnames_file(path: Path) -> dict[str, str]:
    """``<class_folder> <class name text>`` per line -> {folder: prompt text}."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise DataError(f"cannot read class names file {path}: {err}") from err
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DataError(f"{path} line {number}: expected '<class_folder> <class name text>', "
                            f"got {line!r}")
        if key in out:
            raise DataError(f"{path} line {number}: class folder {key!r} is listed twice")
        out[key] = prompt_text(text)
    if not out:
        raise DataError(f"{path} lists no classes; write one '<class_folder> <class name text>' per line")
    return out


def match_classnames(keys: list[str], named: dict[str, str], origin: str) -> list[str]:
    """Texts for ``keys`` from a {key: text} mapping that must name exactly these keys."""
    missing = [k for k in keys if k not in named]
    extra = sorted(set(named) - set(keys))
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"{origin} names class(es) {extra} with no images (no folder / no label)")
        if missing:
            parts.append(f"class(es) {missing} found in the data are missing from {origin}")
        raise DataError("; ".join(parts) + f". The classes in the data are {keys}; make both agree.")
    return [named[k] for k in keys]


def resolve_classnames(keys: list[str], override: Any, where: str) -> list[str]:
    """Prompt text per class, in the order of ``keys``.

    ``override`` (the ``classnames:`` config key) may be None (use the keys), a list of texts in
    label order, a mapping {key: text}, or the path of a classnames.txt-style file.
    """
    if override is None:
        return [prompt_text(k) for k in keys]
    if isinstance(override, (list, tuple)):
        if len(override) != len(keys) or not all(isinstance(t, str) and t.strip() for t in override):
            raise DataError(
                f"{where}: classnames lists {len(override)} names but the data has {len(keys)} "
                f"classes {keys}; give one non-empty name per class in label order"
            )
        return [prompt_text(t) for t in override]
    if isinstance(override, dict):
        named = {str(k): prompt_text(v) for k, v in override.items()}
        return match_classnames(keys, named, f"{where}: classnames")
    if isinstance(override, (str, Path)):
        path = Path(override).expanduser()
        return match_classnames(keys, read_classnames_file(path), str(path))
    raise DataError(
        f"{where}: classnames must be a list, a mapping or a file path, got {type(override).__name__}"
    )


def wordless_classnames(classnames: list[str]) -> list[str]:
    """Class names with no letter in them ("0", "1", "3-b"): prompts built from them say nothing, and
    zero-shot and prompt learning degrade to guessing (measured: 43% -> 12% zero-shot accuracy)."""
    return [c for c in classnames if not any(ch.isalpha() for ch in c)]
