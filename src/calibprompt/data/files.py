"""Datasets backed by image files (folders, CSV manifests, the paper datasets), and the open-time
check that reads every file once: it hashes the bytes and decodes (or header-checks) the image,
so corrupt files are reported when the dataset is opened, not in the middle of training."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from calibprompt.settings import sha256_bytes, sha256_file

from .base import DataError, ImageDataset, Sample, hash_array
from .images import VERIFY_LEVELS, ImageReadError, read_image, verify_bytes

log = logging.getLogger("calibprompt.data")

SKIP_HINT = (
    "Fix or delete these files, or set data.skip_bad: true to skip them "
    "(skips are logged and listed by `calibprompt data inspect`)."
)


@dataclass(frozen=True)
class FileEntry:
    ref: str
    path: Path
    label: int
    split: str
    kind: str  # "image" or "dicom"


class FileDataset(ImageDataset):
    """Samples stored as one file each; ``ref`` is the path relative to the dataset root."""

    def __init__(self, name: str, classnames: list[str], template: str, entries: list[FileEntry],
                 *, source: str, hashes: dict[str, str] | None = None, **kwargs) -> None:
        self.source = source
        self.paths = {e.ref: e.path for e in entries}
        self.kinds = {e.ref: e.kind for e in entries}
        super().__init__(name, classnames, template,
                         [Sample(e.ref, e.label, e.split) for e in entries], **kwargs)
        self._hashes.update(hashes or {})

    def _read(self, sample: Sample) -> Image.Image:
        try:
            return read_image(self.paths[sample.ref], kind=self.kinds[sample.ref])
        except ImageReadError as err:
            raise DataError(f"cannot read image {sample.ref!r} ({self.paths[sample.ref]}): {err}") from err

    def _hash(self, sample: Sample) -> str:
        return sha256_file(self.paths[sample.ref])

    def _pixel_hash(self, sample: Sample) -> str:
        # 8-bit grey or colour pictures hash as stored (an npz array of the same picture hashes the same);
        # anything else (16-bit, alpha, palette, DICOM) as the RGB image the model sees
        if self.kinds[sample.ref] == "dicom":
            return super()._pixel_hash(sample)
        with Image.open(self.paths[sample.ref]) as image:
            if image.mode in ("L", "RGB"):
                return hash_array(np.ascontiguousarray(np.asarray(image)))
        return super()._pixel_hash(sample)


def check_files(entries: list[FileEntry], *, verify: str, skip_bad: bool, where: str
                ) -> tuple[list[FileEntry], list[tuple[str, str]], dict[str, str]]:
    """Read, hash and verify every file. Returns the good entries, ``(ref, reason)`` of the
    skipped ones and the content hashes; raises ``DataError`` listing every bad file unless
    ``skip_bad``."""
    if verify not in VERIFY_LEVELS:
        raise DataError(f"{where}: verify must be one of {list(VERIFY_LEVELS)}, got {verify!r}")

    def check(entry: FileEntry) -> tuple[str | None, str | None]:
        if not entry.path.is_file():
            return None, "file not found"
        if verify == "none":
            return None, None
        try:
            data = entry.path.read_bytes()
            verify_bytes(entry.path, data, entry.kind, verify)
        except ImageReadError as err:
            return None, str(err)
        except OSError as err:
            return None, f"cannot read file ({err.strerror or err})"
        except Exception as err:  # e.g. PIL's DecompressionBombError: still a reportable bad file
            return None, f"cannot decode ({type(err).__name__}: {err})"
        return sha256_bytes(data), None

    workers = min(8, os.cpu_count() or 1)
    if len(entries) < 32 or workers == 1:
        results = [check(e) for e in entries]
    else:  # hashing, zlib and most PIL decoders release the GIL
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(check, entries))

    good, bad, hashes = [], [], {}
    for entry, (digest, reason) in zip(entries, results):
        if reason is None:
            good.append(entry)
            if digest:
                hashes[entry.ref] = digest
        else:
            bad.append((entry, reason))
    if bad and not skip_bad:
        lines = [f"  {e.ref} ({e.path}): {why}" for e, why in bad[:10]]
        if len(bad) > 10:
            lines.append(f"  ... and {len(bad) - 10} more")
        raise DataError(f"{where}: {len(bad)} unreadable image(s):\n" + "\n".join(lines) + "\n" + SKIP_HINT)
    for entry, why in bad:
        log.warning("%s: skipping %s (%s): %s", where, entry.ref, entry.path, why)
    if bad:
        log.warning("%s: skipped %d unreadable image(s) (skip_bad: true)", where, len(bad))
    return good, [(e.ref, why) for e, why in bad], hashes


def check_classes_nonempty(entries: list[FileEntry], classnames: list[str], splits: list[str],
                           skipped: list[tuple[str, str]], where: str, unit: str = "class") -> None:
    """Every class must keep at least one image in every split of the source."""
    present = {(e.split, e.label) for e in entries}
    for split in splits:
        for label, text in enumerate(classnames):
            if (split, label) not in present:
                part = f" in split {split!r}" if split else ""
                extra = f" after skipping {len(skipped)} unreadable file(s)" if skipped else ""
                raise DataError(f"{where}: {unit} {label} ({text!r}){part} has no images{extra}; "
                                "add images or remove the class")
