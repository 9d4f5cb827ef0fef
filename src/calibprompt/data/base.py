"""The data contract: ``Sample``, ``DataError`` and the ``ImageDataset`` base class."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from PIL import Image

from calibprompt.settings import sha256_json

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad data or data configuration. The message names the file, row or key and the fix."""


@dataclass(frozen=True)
class Sample:
    ref: str  # stable id inside the dataset: relative file path, or "<split>/<index>" for arrays
    label: int  # 0..K-1
    split: str  # "train", "val", "test" or "" when the source carries no split


class ImageDataset:
    """A labelled image collection. Subclasses implement ``_read`` and ``_hash``.

    ``skipped`` lists ``(ref, reason)`` for images left out under ``skip_bad: true``;
    ``ignored`` lists files found beside the images that are not images (never silently dropped:
    both are logged and shown by ``calibprompt data inspect``).
    """

    source: str = ""

    def __init__(
        self,
        name: str,
        classnames: list[str],
        template: str,
        samples: list[Sample],
        *,
        location: str = "",
        test_fraction: float | None = None,
        skipped: list[tuple[str, str]] | None = None,
        ignored: list[str] | None = None,
    ) -> None:
        self.name = name
        self.classnames = list(classnames)
        self.template = template
        self.samples = list(samples)
        self.location = location
        self.test_fraction = test_fraction
        self.skipped = list(skipped or [])
        self.ignored = list(ignored or [])
        self._by_ref = {s.ref: s for s in self.samples}
        if len(self._by_ref) != len(self.samples):
            dup = [r for r, n in Counter(s.ref for s in self.samples).items() if n > 1][:5]
            raise DataError(f"dataset {name!r}: duplicate sample refs {dup}")
        self._hashes: dict[str, str] = {}

    # -- subclass hooks ---------------------------------------------------------------------
    def _read(self, sample: Sample) -> Image.Image:
        raise NotImplementedError

    def _hash(self, sample: Sample) -> str:
        raise NotImplementedError

    # -- public API -------------------------------------------------------------------------
    def load(self, sample: Sample | str) -> Image.Image:
        """The image of ``sample`` (or of a ref) as an RGB PIL image."""
        sample = self.get(sample)
        try:
            image = self._read(sample)
        except DataError:
            raise
        except Exception as err:  # a file changed or vanished after the dataset was opened
            raise DataError(f"dataset {self.name!r}: cannot load {sample.ref!r}: {err}") from err
        return image if image.mode == "RGB" else image.convert("RGB")

    def content_hash(self, sample: Sample | str) -> str:
        """sha256 hex of the raw content (file bytes, or array bytes + shape), memoised."""
        sample = self.get(sample)
        digest = self._hashes.get(sample.ref)
        if digest is None:
            try:
                digest = self._hash(sample)
            except OSError as err:
                raise DataError(f"dataset {self.name!r}: cannot read {sample.ref!r}: {err}") from err
            self._hashes[sample.ref] = digest
        return digest

    def pixel_hash(self, sample: Sample | str) -> str:
        """sha256 of the decoded 8-bit pixels (``hash_array``), memoised: the same picture stored as a PNG,
        in a CSV-listed file or in an npz array has the same pixel hash, so it gets the same shots
        (few-shot splits rank by it; ``split_by: bytes`` ranks by ``content_hash`` instead)."""
        sample = self.get(sample)
        cache = self.__dict__.setdefault("_pixel_hashes", {})
        if sample.ref not in cache:
            cache[sample.ref] = self._pixel_hash(sample)
        return cache[sample.ref]

    def _pixel_hash(self, sample: Sample) -> str:
        import numpy as np

        return hash_array(np.ascontiguousarray(np.asarray(self.load(sample))))

    def get(self, ref: Sample | str) -> Sample:
        """The ``Sample`` with this ref; ``DataError`` when the dataset has none."""
        if isinstance(ref, Sample):
            return ref
        try:
            return self._by_ref[ref]
        except KeyError:
            raise DataError(f"dataset {self.name!r} has no sample {ref!r}") from None

    def __contains__(self, ref: object) -> bool:
        return ref in self._by_ref

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, classes={len(self.classnames)}, "
            f"samples={len(self.samples)}, location={self.location!r})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def has_split(self) -> bool:
        """True when the source assigns train/test itself (no ``test_fraction`` needed)."""
        return any(s.split for s in self.samples)

    def samples_in(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    def counts(self) -> dict[str, list[int]]:
        """Images per split ("" for unsplit sources) and label."""
        out: dict[str, list[int]] = {}
        for s in self.samples:
            out.setdefault(s.split, [0] * self.num_classes)[s.label] += 1
        return dict(sorted(out.items(), key=lambda kv: _split_rank(kv[0])))

    def fingerprint(self) -> str:
        """Hash of every (ref, label, split, content hash): changes when any image or label does."""
        rows = sorted((s.ref, s.label, s.split, self.content_hash(s)) for s in self.samples)
        return sha256_json(rows)

    def duplicates(self) -> dict[str, int]:
        """``within``: images whose content equals an earlier image's; ``cross_split``: images of
        the test split whose content also occurs in train or val (leakage)."""
        seen: Counter[str] = Counter(self.content_hash(s) for s in self.samples)
        within = sum(n - 1 for n in seen.values())
        fit = {self.content_hash(s) for s in self.samples if s.split in ("train", "val")}
        cross = sum(1 for s in self.samples if s.split == "test" and self.content_hash(s) in fit)
        return {"within": within, "cross_split": cross}

    def prompts(self) -> list[str]:
        """The zero-shot prompt of every class."""
        return [self.template.format(c) for c in self.classnames]


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def hash_array(array) -> str:
    """sha256 of an array's dtype, shape and bytes (so a resized copy hashes differently)."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{tuple(array.shape)}".encode())
    digest.update(memoryview(array).cast("B") if array.flags.c_contiguous else array.tobytes())
    return digest.hexdigest()


def check_template(template: str, where: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise DataError(
            f"{where}: template must be a string with exactly one '{{}}' for the class name, "
            f"got {template!r}"
        )
    return template
