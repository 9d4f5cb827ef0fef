"""Few-shot splits that depend only on (image content, labels, shots, seed), never on the order in
which files are listed (docs/method.md §7.4, Q15), saved and reloaded as JSON.

Algorithm (docs/data.md):
- every candidate of a class is ranked by sha256("calibprompt/fewshot/<seed>/<content hash>"),
  ties (identical content) by ref; the first ``shots`` distinct images are the training shots;
- validation shots are the next ``val_shots`` distinct images of the train pool, or, when the
  source has its own val split, the first ``val_shots`` of that split ranked the same way; the
  training shots are the same with or without validation shots;
- the test part is the source's test split; for unsplit sources it is a per-class fraction of
  the images ranked by a seed-independent content key, so every seed sees the same test set and
  identical images never straddle train and test.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibprompt.settings import atomic_write_json

from .base import DataError, ImageDataset, Sample

SPLIT_FORMAT = "calibprompt.split/1"
PARTS = ("train", "val", "test")


def content_rank(salt: str, digest: str) -> str:
    """A deterministic, seed-salted order key of a content hash (how shots are drawn)."""
    return hashlib.sha256(f"calibprompt/{salt}/{digest}".encode()).hexdigest()


SPLIT_BY = ("pixels", "bytes")


def _ranked(dataset: ImageDataset, samples: list[Sample], salt: str, by: str = "pixels") -> list[Sample]:
    """Samples in the order of a seed-salted key of their content: their decoded pixels (the default, so
    the same images give the same shots in any file format) or their stored bytes (``by="bytes"``, the
    rule of calibprompt 0.1)."""
    key = _identity(dataset, by)
    return sorted(samples, key=lambda s: (content_rank(salt, key(s)), s.ref))


def _identity(dataset: ImageDataset, by: str):
    """What makes two images "the same" for a split: their decoded pixels, or their stored bytes. Ranking,
    de-duplication, hold-out groups and the leakage count all use it, so they agree."""
    return dataset.pixel_hash if by == "pixels" else dataset.content_hash


def holdout_test(dataset: ImageDataset, fraction: float, by: str = "pixels") -> tuple[list[Sample], list[Sample]]:
    """(train pool, test) of an unsplit dataset: per class, round(fraction * n) images, taken
    whole groups of identical content at a time, in the order of a seed-independent content key."""
    if not 0 < fraction < 1:
        raise DataError(f"test_fraction must be between 0 and 1, got {fraction!r}")
    pool, test = [], []
    for label, text in enumerate(dataset.classnames):
        members = _ranked(dataset, [s for s in dataset.samples if s.label == label], "test", by)
        target = math.floor(fraction * len(members) + 0.5)
        groups: list[list[Sample]] = []  # identical content ranks equal, so groups are contiguous
        same = _identity(dataset, by)
        for sample in members:
            if groups and same(groups[-1][0]) == same(sample):
                groups[-1].append(sample)
            else:
                groups.append([sample])
        taken = 0
        for group in groups:
            if taken < target:
                test += group
                taken += len(group)
            else:
                pool += group
        if not taken or taken == len(members):
            raise DataError(
                f"dataset {dataset.name!r}: class {label} ({text!r}) has {len(members)} image(s); "
                f"test_fraction {fraction} leaves {'no test' if not taken else 'no training'} image. "
                "Change test_fraction or add images"
            )
    return pool, test


@dataclass
class FewShotSplit:
    """Refs of the training shots, validation shots and test images of one dataset."""

    train: list[str]
    val: list[str]
    test: list[str]
    shots: int | None
    seed: int | None
    val_shots: int = 0
    val_source: str = "none"  # "train" (held out of the train pool), "val" (source's val split)
    test_fraction: float | None = None
    dataset_name: str = ""
    fingerprint: str = ""
    classnames: list[str] = field(default_factory=list)
    overlap: int = 0  # train/val shots whose content also occurs in the test part
    labels: dict[str, int] = field(default_factory=dict, repr=False)
    hashes: dict[str, str] = field(default_factory=dict, repr=False)
    dataset: ImageDataset | None = field(default=None, repr=False, compare=False)

    def samples_for(self, part: str) -> list[Sample]:
        """The ``Sample`` objects of ``part`` ("train", "val" or "test")."""
        if part not in PARTS:
            raise DataError(f"split part must be one of {list(PARTS)}, got {part!r}")
        if self.dataset is None:
            raise DataError("this split is not bound to a dataset; load it with "
                            "FewShotSplit.from_json(path, dataset)")
        return [self.dataset.get(ref) for ref in getattr(self, part)]

    def to_dict(self) -> dict[str, Any]:
        def items(refs: list[str]) -> list[dict[str, Any]]:
            return [{"ref": r, "label": self.labels[r], "sha256": self.hashes[r]} for r in refs]

        return {
            "format": SPLIT_FORMAT, "dataset": self.dataset_name, "fingerprint": self.fingerprint,
            "shots": self.shots, "val_shots": self.val_shots, "seed": self.seed,
            "val_source": self.val_source, "test_fraction": self.test_fraction,
            "classnames": self.classnames, "overlap": self.overlap,
            "train": items(self.train), "val": items(self.val), "test": items(self.test),
        }

    def to_json(self, path: str | Path) -> None:
        """Write the split atomically (readers never see half a file)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path, dataset: ImageDataset,
                  check_content: bool = True) -> "FewShotSplit":
        """Load a split written by ``to_json`` (or a hand-written one whose parts list refs) and
        check it against ``dataset``: every ref must exist, labels must match, and with
        ``check_content`` the images must still have the recorded sha256."""
        return _load_split(Path(path), dataset, check_content)


def make_split(dataset: ImageDataset, shots: int, seed: int, val_shots: int = 0,
               test_fraction: float | None = None, by: str = "pixels") -> FewShotSplit:
    """Deterministic few-shot split of ``dataset`` (see the module docstring); ``by`` ranks images by
    their decoded pixels (default) or their stored bytes (see :func:`_ranked`)."""
    if by not in SPLIT_BY:
        raise DataError(f"split_by must be one of {SPLIT_BY}, got {by!r}")
    for name, value in (("shots", shots), ("val_shots", val_shots), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 0):
            kind = "an integer" if name == "seed" else "a non-negative integer"
            raise DataError(f"{name} must be {kind}, got {value!r}")
    if dataset.has_split:
        if test_fraction is not None:
            raise DataError(f"dataset {dataset.name!r} has its own test split; test_fraction applies "
                            "only to sources without one")
        pool, test = dataset.samples_in("train"), dataset.samples_in("test")
        val_pool = dataset.samples_in("val") or None
    else:
        test_fraction = test_fraction if test_fraction is not None else dataset.test_fraction
        if test_fraction is None:
            raise DataError(f"dataset {dataset.name!r} has no train/test split; set data.test_fraction "
                            "(e.g. 0.3) to hold out a deterministic test set")
        pool, test = holdout_test(dataset, test_fraction, by)
        val_pool = None
    if not test:
        raise DataError(f"dataset {dataset.name!r} has no test images")

    train, val = [], []
    for label, text in enumerate(dataset.classnames):
        salt = f"fewshot/{seed}"
        candidates = _distinct(dataset, _ranked(dataset, [s for s in pool if s.label == label], salt, by), by)
        need = shots + (val_shots if val_pool is None else 0)
        if len(candidates) < need:
            raise DataError(
                f"dataset {dataset.name!r}: class {label} ({text!r}) has {len(candidates)} distinct "
                f"training image(s) but shots{' + val_shots' if need != shots else ''} = {need}; "
                "lower shots/val_shots or add images"
            )
        train += candidates[:shots]
        if val_pool is None:
            val += candidates[shots:need]
        elif val_shots:
            same = _identity(dataset, by)
            taken = {same(s) for s in candidates[:shots]}
            ranked_val = _ranked(dataset, [s for s in val_pool if s.label == label], salt, by)
            options = [s for s in _distinct(dataset, ranked_val, by) if same(s) not in taken]
            if len(options) < val_shots:
                raise DataError(f"dataset {dataset.name!r}: class {label} ({text!r}) has {len(options)} "
                                f"usable image(s) in the val split but val_shots = {val_shots}")
            val += options[:val_shots]

    split = FewShotSplit(
        train=[s.ref for s in train], val=[s.ref for s in val], test=sorted(s.ref for s in test),
        shots=shots, seed=seed, val_shots=val_shots,
        val_source="none" if not val_shots else ("train" if val_pool is None else "val"),
        test_fraction=test_fraction if not dataset.has_split else None,
        dataset_name=dataset.name, fingerprint=dataset.fingerprint(),
        classnames=list(dataset.classnames), dataset=dataset,
    )
    _bind(split, dataset, _identity(dataset, by))
    return split


def _distinct(dataset: ImageDataset, ranked: list[Sample], by: str = "pixels") -> list[Sample]:
    """Drop repeats of the same content, so a duplicated image is never picked twice."""
    same = _identity(dataset, by)
    seen, out = set(), []
    for sample in ranked:
        digest = same(sample)
        if digest not in seen:
            seen.add(digest)
            out.append(sample)
    return out


def _bind(split: FewShotSplit, dataset: ImageDataset, same=None) -> None:
    """Fill labels, hashes and the train/val-vs-test content overlap (warned about); ``same`` is the
    image identity of the split (bytes by default, for splits read from files)."""
    refs = split.train + split.val + split.test
    split.labels = {r: dataset.get(r).label for r in refs}
    split.hashes = {r: dataset.content_hash(r) for r in refs}
    same = same or dataset.content_hash
    test_ids = {same(r) for r in split.test}
    split.overlap = sum(1 for r in split.train + split.val if same(r) in test_ids)
    if split.overlap:
        warnings.warn(
            f"dataset {dataset.name!r}: {split.overlap} training/validation shot(s) have the same "
            "image content as a test image (train/test leakage in the source)", stacklevel=3,
        )


def _load_split(path: Path, dataset: ImageDataset, check_content: bool) -> FewShotSplit:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise DataError(f"split file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "train" not in data or "test" not in data:
        raise DataError(f"split file {path}: expected a JSON object with 'train' and 'test' lists")
    if data.get("format", SPLIT_FORMAT) != SPLIT_FORMAT:
        raise DataError(f"split file {path}: format {data.get('format')!r}, expected {SPLIT_FORMAT!r}")
    if "classnames" in data and len(data["classnames"]) != dataset.num_classes:
        raise DataError(f"split file {path} is for {len(data['classnames'])} classes; dataset "
                        f"{dataset.name!r} has {dataset.num_classes}")

    parts: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    fix = "regenerate it with make_split for this dataset, or open the dataset it was made for"
    for part in PARTS:
        items = data.get(part) or []
        if not isinstance(items, list):
            raise DataError(f"split file {path}: '{part}' must be a list")
        parts[part] = []
        for i, item in enumerate(items):
            entry = {"ref": item} if isinstance(item, str) else item
            if not isinstance(entry, dict) or not isinstance(entry.get("ref"), str):
                raise DataError(f"split file {path}: {part}[{i}] must be a ref string or an object "
                                "with 'ref'")
            ref = entry["ref"]
            if ref not in dataset:
                raise DataError(f"split file {path}: {part} image {ref!r} is not in dataset "
                                f"{dataset.name!r} ({dataset.location}); {fix}")
            if ref in owner:
                raise DataError(f"split file {path}: {ref!r} is listed in both {owner[ref]} and {part}")
            owner[ref] = part
            if "label" in entry and entry["label"] != dataset.get(ref).label:
                raise DataError(f"split file {path}: {part} image {ref!r} has label {entry['label']!r} "
                                f"in the file but {dataset.get(ref).label} in the dataset; {fix}")
            if check_content and "sha256" in entry and entry["sha256"] != dataset.content_hash(ref):
                raise DataError(f"split file {path}: the content of {ref!r} changed since the split "
                                f"was made (sha256 differs); {fix}")
            parts[part].append(ref)
    if not parts["test"]:
        raise DataError(f"split file {path} has an empty test list")

    split = FewShotSplit(
        train=parts["train"], val=parts["val"], test=parts["test"],
        shots=data.get("shots"), seed=data.get("seed"), val_shots=int(data.get("val_shots") or 0),
        val_source=data.get("val_source", "none"), test_fraction=data.get("test_fraction"),
        dataset_name=data.get("dataset", dataset.name), fingerprint=data.get("fingerprint", ""),
        classnames=list(dataset.classnames), dataset=dataset,
    )
    if check_content and split.fingerprint and split.fingerprint != dataset.fingerprint():
        warnings.warn(f"split file {path} was made from a different version of dataset "
                      f"{dataset.name!r} (fingerprint differs); its images were checked and are "
                      "intact, but new images are not in it", stacklevel=3)
    _bind(split, dataset)
    return split
