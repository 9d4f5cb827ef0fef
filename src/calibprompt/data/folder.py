"""Image folders: ``<path>/<class>/*`` or ``<path>/{train,[val,]test}/<class>/*``, and BAPLe's
``<path>/images/{train,test}/<class>/*`` with ``<path>/classnames.txt``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .base import SPLITS, DataError
from .classes import choose_template, match_classnames, read_classnames_file, resolve_classnames
from .files import FileDataset, FileEntry, check_classes_nonempty, check_files
from .images import image_kind

log = logging.getLogger("calibprompt.data")

CLASSNAMES_FILE = "classnames.txt"


def _visible(path: Path) -> list[Path]:
    """Directory entries without hidden files and macOS zip debris, sorted by name."""
    try:
        children = list(path.iterdir())
    except OSError as err:
        raise DataError(f"cannot list folder {path}: {err}") from err
    return sorted((p for p in children if not p.name.startswith(".") and p.name != "__MACOSX"),
                  key=lambda p: p.name)


def find_image_root(root: Path) -> Path:
    """``root`` itself, or ``root/images`` for BAPLe's layout (an ``images/`` folder holding
    ``train/``, possibly beside ``classnames.txt``)."""
    from .official import OFFICIAL_CACHE_FILES

    dirs = [p for p in _visible(root) if p.is_dir() and p.name not in OFFICIAL_CACHE_FILES]
    if [p.name for p in dirs] == ["images"] and (root / "images" / "train").is_dir():
        left = sorted(name for name in OFFICIAL_CACHE_FILES if (root / name).exists())
        if left:  # written by the official code's first run: never read (nor unpickled) here
            from calibprompt.progress import note

            note(f"{root}: ignoring the official code's cache files {left} (import its few-shot split with "
                 "split_file: .../split_fewshot/shot_<k>-seed_<s>.pkl)", key=f"official-cache:{root}")
        return root / "images"
    return root


def scan_folder(root: Path, where: str, require_split: bool = False
                ) -> tuple[Path, list[str], list[str], list[FileEntry], list[str]]:
    """List the images under ``root``. Returns (image root, splits, class folder names in label
    order, entries, ignored files). Labels follow the alphabetical order of the class folders."""
    if not root.is_dir():
        raise DataError(f"{where}: folder {root} does not exist")
    image_root = find_image_root(root)
    dirs = [p for p in _visible(image_root) if p.is_dir()]
    names = {p.name for p in dirs}
    ignored: list[str] = []  # images outside any class folder, and non-image files inside them
    if names & set(SPLITS):
        layouts = ("Use either <path>/<class>/* or <path>/train/<class>/* and <path>/test/<class>/* "
                   "(val/ optional)")
        if names - set(SPLITS):
            raise DataError(f"{where}: {image_root} mixes split and class folders "
                            f"({sorted(names)}). {layouts}")
        if not {"train", "test"} <= names:
            raise DataError(f"{where}: {image_root} has split folders {sorted(names)} but needs both "
                            f"train/ and test/. {layouts}")
        splits = [s for s in SPLITS if s in names]
        split_dirs = {s: image_root / s for s in splits}
    elif require_split:
        raise DataError(f"{where}: {image_root} must hold train/ and test/ folders of class folders")
    else:
        splits = [""]
        split_dirs = {"": image_root}
    if not dirs:
        raise DataError(f"{where}: {image_root} has no class folders; expected <class>/<image files>")

    per_split: dict[str, list[Path]] = {}
    for split, folder in split_dirs.items():
        per_split[split] = [p for p in _visible(folder) if p.is_dir()]
        ignored += [p.relative_to(image_root).as_posix() for p in _visible(folder)
                    if p.is_file() and image_kind(p)]
    keys = sorted({p.name for dirs_ in per_split.values() for p in dirs_})
    for split, class_dirs in per_split.items():
        missing = sorted(set(keys) - {p.name for p in class_dirs})
        if missing:
            raise DataError(
                f"{where}: split folder {split_dirs[split]} lacks class folder(s) {missing}; every "
                "split needs the same class folders, or the labels (alphabetical folder order) differ"
            )
    if not keys:
        raise DataError(f"{where}: no class folders under {image_root}")

    entries: list[FileEntry] = []
    for split, class_dirs in per_split.items():
        for class_dir in class_dirs:
            label = keys.index(class_dir.name)
            found = 0
            for item in _visible(class_dir):
                ref = item.relative_to(image_root).as_posix()
                if item.is_dir():
                    raise DataError(
                        f"{where}: class folder {class_dir} contains the sub-folder {item.name!r}; images "
                        "must sit directly in their class folder"
                    )
                kind = image_kind(item)
                if kind is None:
                    ignored.append(ref)
                    continue
                entries.append(FileEntry(ref, item, label, split, kind))
                found += 1
            if not found:
                raise DataError(f"{where}: class folder {class_dir} is empty (no image files); "
                                "add images or remove the folder")
    if ignored:
        log.warning("%s: ignoring %d file(s) (not images, or images outside a class folder), e.g. %s",
                    where, len(ignored), ignored[:3])
    return image_root, splits, keys, entries, ignored


def find_classnames_file(root: Path, image_root: Path) -> Path | None:
    for folder in (root, image_root):
        if (folder / CLASSNAMES_FILE).is_file():
            return folder / CLASSNAMES_FILE
    return None


def open_folder(cfg: dict[str, Any], where: str = "data") -> FileDataset:
    root = Path(cfg["path"]).expanduser()
    image_root, splits, keys, entries, ignored = scan_folder(root, where)
    name = cfg.get("name") or root.resolve().name
    if cfg.get("classnames") is not None:
        classnames = resolve_classnames(keys, cfg["classnames"], where)
    elif (txt := find_classnames_file(root, image_root)) is not None:
        classnames = match_classnames(keys, read_classnames_file(txt), str(txt))
    else:
        classnames = resolve_classnames(keys, None, where)
    return build_file_dataset(cfg, where, name=name, classnames=classnames, entries=entries,
                              splits=splits, ignored=ignored, location=str(root), source="folder")


def build_file_dataset(cfg: dict[str, Any], where: str, *, name: str, classnames: list[str],
                       entries: list[FileEntry], splits: list[str], ignored: list[str],
                       location: str, source: str) -> FileDataset:
    """Verify the files, check no class lost all its images, and build the dataset."""
    test_fraction = check_test_fraction(cfg.get("test_fraction"), splits != [""], where)
    good, skipped, hashes = check_files(entries, verify=cfg.get("verify") or "full",
                                        skip_bad=bool(cfg.get("skip_bad")), where=where)
    check_classes_nonempty(good, classnames, splits, skipped, where)
    return FileDataset(
        name, classnames, choose_template(cfg.get("template"), name, where), good,
        source=source, hashes=hashes, location=location, test_fraction=test_fraction,
        skipped=skipped, ignored=ignored,
    )


def check_test_fraction(value: Any, has_split: bool, where: str) -> float | None:
    if value is None:
        return None
    if has_split:
        raise DataError(f"{where}: test_fraction applies only to sources without their own test "
                        "split; this source has one, remove test_fraction")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DataError(f"{where}: test_fraction must be a number between 0 and 1, got {value!r}")
    return float(value)
