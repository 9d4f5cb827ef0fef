"""CSV/TSV manifests: one row per image with ``path``, ``label`` and optionally ``split``.

Paths are relative to the manifest's folder (absolute paths are kept). Labels are class names
(alphabetical label order unless ``classnames`` is a list, whose order wins) or integer indices
(which need ``classnames`` for the prompt text)."""

from __future__ import annotations

import csv
import posixpath
import re
from pathlib import Path
from typing import Any

from .base import SPLITS, DataError
from .classes import match_classnames, prompt_text, read_classnames_file
from .files import FileDataset, FileEntry
from .folder import build_file_dataset
from .images import image_kind

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_INT = re.compile(r"^[+-]?\d+$")


def open_csv(cfg: dict[str, Any], where: str = "data") -> FileDataset:
    manifest = Path(cfg["path"]).expanduser()
    if not manifest.is_file():
        raise DataError(f"{where}: manifest {manifest} does not exist")
    delimiter = cfg.get("delimiter") or ("\t" if manifest.suffix.lower() in (".tsv", ".tab") else ",")
    path_col = cfg.get("path_column") or "path"
    label_col = cfg.get("label_column") or "label"
    split_col = cfg.get("split_column")
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            header = [h.strip() for h in next(reader, [])]
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{where}: cannot read manifest {manifest}: {err}") from err

    wanted = [path_col, label_col] + ([split_col] if split_col else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(
            f"{manifest}: missing column(s) {missing}; the header is {header}. Name the columns "
            "'path,label[,split]' or set data.path_column / label_column / split_column"
        )
    split_col = split_col or ("split" if "split" in header else None)
    col = {name: header.index(name) for name in header}

    records: list[tuple[int, str, Path, str, str]] = []  # line, ref, file, label text, split
    first_line: dict[str, int] = {}
    for line, row in rows:
        row = row + [""] * (len(header) - len(row))
        raw_path, raw_label = row[col[path_col]].strip(), row[col[label_col]].strip()
        if not raw_path or not raw_label:
            raise DataError(f"{manifest} line {line}: empty {path_col if not raw_path else label_col!r}")
        ref, file = _resolve(raw_path, manifest.parent)
        if ref in first_line:
            raise DataError(f"{manifest} line {line}: duplicate path {raw_path!r} (also on line "
                            f"{first_line[ref]}); each image must appear once")
        first_line[ref] = line
        split = ""
        if split_col:
            value = row[col[split_col]].strip().lower()
            if value not in _SPLIT_ALIASES:
                raise DataError(f"{manifest} line {line}: split {value!r} is not one of train, val, "
                                "test; fill the split of every row, or drop the split column")
            split = _SPLIT_ALIASES[value]
        records.append((line, ref, file, raw_label, split))
    if not records:
        raise DataError(f"{manifest} has a header but no rows")

    keys, classnames, index = _classes(records, cfg.get("classnames"), manifest, where)
    splits = [""]
    if split_col:
        splits = [s for s in SPLITS if any(r[4] == s for r in records)]
        if not {"train", "test"} <= set(splits):
            raise DataError(f"{manifest}: the split column must give both train and test rows (has "
                            f"{splits}); or drop it and set data.test_fraction")
    entries = [FileEntry(ref, file, index[label], split, image_kind(file) or "image")
               for _, ref, file, label, split in records]
    name = cfg.get("name") or manifest.stem
    return build_file_dataset(cfg, where, name=name, classnames=classnames, entries=entries,
                              splits=splits, ignored=[], location=str(manifest), source="csv")


def _resolve(raw: str, base: Path) -> tuple[str, Path]:
    """(ref, file) for a path cell; refs are normalised so './a.png' and 'a.png' collide."""
    text = raw.replace("\\", "/")
    if Path(text).is_absolute():
        return posixpath.normpath(text), Path(text)
    ref = posixpath.normpath(text)
    return ref, base / ref


def _classes(records, override: Any, manifest: Path, where: str
             ) -> tuple[list[str], list[str], dict[str, int]]:
    """(class keys, prompt texts, label cell -> index) with every label checked."""
    labels = [r[3] for r in records]
    integer = all(_INT.match(x) for x in labels)
    if integer:
        if override is None:
            raise DataError(f"{manifest}: labels are integer indices, so data.classnames must give "
                            "the class name (prompt text) of each index, as a list in label order")
        if isinstance(override, (list, tuple)):
            texts = [prompt_text(t) for t in override]
        else:
            named = override if isinstance(override, dict) else read_classnames_file(Path(override))
            keys = [str(i) for i in range(len(named))]
            texts = match_classnames(keys, {str(k): prompt_text(v) for k, v in named.items()},
                                     f"{where}: classnames")
        for line, _, _, label, _ in records:
            if not 0 <= int(label) < len(texts):
                raise DataError(f"{manifest} line {line}: label {label} is out of range; there are "
                                f"{len(texts)} classes (0..{len(texts) - 1}) in data.classnames")
        return [str(i) for i in range(len(texts))], texts, {x: int(x) for x in set(labels)}

    if isinstance(override, (list, tuple)):
        keys = [str(t).strip() for t in override]
        texts = [prompt_text(k) for k in keys]
    elif override is not None:
        named = override if isinstance(override, dict) else read_classnames_file(Path(override))
        named = {str(k).strip(): prompt_text(v) for k, v in named.items()}
        keys = sorted(named)
        texts = [named[k] for k in keys]
    else:
        keys = sorted(set(labels))
        texts = [prompt_text(k) for k in keys]
    index = {k: i for i, k in enumerate(keys)}
    for line, _, _, label, _ in records:
        if label not in index:
            raise DataError(f"{manifest} line {line}: unknown label {label!r}; the classes are {keys} "
                            "(from data.classnames)")
    return keys, texts, index
