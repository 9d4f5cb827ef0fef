"""Reading image files as 8-bit RGB: ordinary formats through PIL, DICOM through pydicom.

Intensity rules (see docs/data.md):
- 8-bit images are taken as they are; grey becomes RGB by repeating the channel (PIL
  ``convert("RGB")``), alpha is dropped.
- Integer images deeper than 8 bits (16-bit PNG/TIFF) and float images are min-max scaled per
  image to 0..255, because PIL's own conversion clips everything above 255 to white.
- DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or window, then scaled to 0..255
  over the VOI output range (or min-max when the file stores no window); MONOCHROME1 is inverted.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".dcm", ".dicom"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
VERIFY_LEVELS = ("full", "quick", "none")


class ImageReadError(Exception):
    """An image that cannot be decoded; the message says why."""


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def image_kind(path: Path) -> str | None:
    """'dicom', 'image' or None (not an image). Files without a suffix count when they carry the
    DICOM preamble, since DICOM exports often have no extension."""
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == "":
        try:
            with open(path, "rb") as handle:
                return "dicom" if is_dicom_bytes(handle.read(132)) else None
        except OSError:
            return None
    return None


def read_image(path: str | os.PathLike, data: bytes | None = None, kind: str | None = None) -> Image.Image:
    """Decode a file (or its already-read bytes) to an RGB image; ``ImageReadError`` if it can't."""
    path = Path(path)
    kind = kind or image_kind(path) or "image"
    if data is None:
        data = path.read_bytes()
    if kind == "dicom":
        return Image.fromarray(dicom_to_uint8(data)).convert("RGB")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(_pil_reason(err)) from err


def verify_bytes(path: Path, data: bytes, kind: str, level: str) -> None:
    """Check that ``data`` is a usable image: ``full`` decodes it, ``quick`` checks the header
    and structure only (PIL ``verify()``; a DICOM header with pixel data)."""
    if level == "full":
        read_image(path, data, kind)
        return
    if kind == "dicom":
        ds = _dcmread(data)
        if "PixelData" not in ds:
            raise ImageReadError("DICOM file has no pixel data")
        _check_frames(ds)
        return
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(_pil_reason(err)) from err


def _pil_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format (corrupt or not an image)"
    return f"corrupt or truncated image ({err})"


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with ``convert("RGB")`` semantics, scaling high-bit-depth grey instead of clipping."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(scale_to_uint8(np.asarray(image))).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def scale_to_uint8(array: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linear map of [lo, hi] (default: the array's min and max) to 0..255, clipped."""
    array = np.asarray(array, dtype=np.float64)
    lo = float(np.min(array)) if lo is None else lo
    hi = float(np.max(array)) if hi is None else hi
    if lo > hi:
        lo, hi = hi, lo
    if hi - lo <= 0:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (array - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# -- DICOM -----------------------------------------------------------------------------------
def _dcmread(data: bytes):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise ImageReadError(f"not a readable DICOM file ({err})") from err


def _check_frames(ds) -> None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(
            f"multi-frame DICOM ({frames} frames) is not supported; export the frame you want "
            "as its own file"
        )


def dicom_to_uint8(data: bytes) -> np.ndarray:
    """DICOM bytes -> uint8 array (H, W) for grey or (H, W, 3) for colour."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dcmread(data)
    if "PixelData" not in ds:
        raise ImageReadError("DICOM file has no pixel data")
    _check_frames(ds)
    try:
        raw = ds.pixel_array
    except Exception as err:  # missing decoder plugin, broken pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ImageReadError(
            f"pydicom cannot decode the pixel data (transfer syntax {syntax}): {err}. "
            "Compressed DICOM needs a decoder plugin: pip install 'calibprompt[dicom]' (pylibjpeg with its JPEG and "
            "JPEG 2000 codecs); JPEG-LS needs pyjpegls or python-gdcm"
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim == 3:  # colour: pydicom already converted YBR to RGB
        return raw if raw.dtype == np.uint8 else scale_to_uint8(raw)
    if raw.ndim != 2:
        raise ImageReadError(f"unsupported DICOM pixel array shape {raw.shape}")

    has_rescale = "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds or "WindowWidth" in ds
    values = apply_modality_lut(raw, ds) if has_rescale else raw
    if has_voi:
        try:
            windowed = apply_voi_lut(values, ds, prefer_lut=True)
        except ValueError as err:
            raise ImageReadError(f"invalid DICOM window/VOI LUT: {err}") from err
        lo, hi = _voi_range(ds)
        out = scale_to_uint8(windowed, lo, hi)
    elif raw.dtype == np.uint8 and not has_rescale:
        out = raw  # plain 8-bit data (e.g. RSNA18): keep the stored values
    else:
        out = scale_to_uint8(values)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        out = 255 - out
    return np.ascontiguousarray(out)


def _voi_range(ds) -> tuple[float, float]:
    """Output range of pydicom's VOI step (mirrors pydicom's ``apply_windowing``/LUT rules)."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        y_min, y_max = 0.0, float(2**bits - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        y_min, y_max = -float(2 ** (int(ds.BitsStored) - 1)), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)
