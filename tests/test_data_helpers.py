"""Builders for the data tests: small synthetic images, class folders and DICOM files.
(No tests here; the file is named test_data_* so it sits with the tests that use it.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise(key: str, size: tuple[int, int] = (12, 12), channels: int = 3) -> np.ndarray:
    """Deterministic random uint8 image; different keys give different content."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    shape = size + ((channels,) if channels > 1 else ())
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_tree(root: Path, classes: dict[str, int], split: str | None = None, ext: str = ".png",
              tag: str = "") -> list[Path]:
    """``root[/split]/<class>/img<i><ext>`` with distinct content per file."""
    written = []
    for cls, n in classes.items():
        for i in range(n):
            base = root / split if split else root
            written.append(save(base / cls / f"img{i}{ext}", noise(f"{tag}{split}/{cls}/{i}")))
    return written


def write_dicom(path: Path, array: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None) -> Path:
    """A minimal single-frame grey DICOM file (Secondary Capture, explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5.6.7"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if array.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.ascontiguousarray(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
