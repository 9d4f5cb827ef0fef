"""Compressed DICOM: with the `dicom` extra (pylibjpeg and its JPEG / JPEG 2000 codecs) a JPEG-compressed
file reads to the same image as its uncompressed original; a syntax no installed plugin decodes is an
error that says how to get a decoder."""

from __future__ import annotations

import numpy as np
import pytest

from calibprompt.data.images import ImageReadError, dicom_to_uint8
from tests.test_data_helpers import write_dicom


def _compressed(tmp_path, syntax_name: str):
    from pydicom import dcmread, uid

    rng = np.random.default_rng(0)
    raw = (rng.integers(0, 4096, (64, 80)) // 16 * 16).astype(np.uint16)  # 12-bit CT-like values
    plain = write_dicom(tmp_path / "plain.dcm", raw, bits_stored=12, window=(2048, 4096))
    ds = dcmread(plain)
    ds.compress(getattr(uid, syntax_name), encoding_plugin="pylibjpeg")
    path = tmp_path / f"{syntax_name}.dcm"
    ds.save_as(path)
    return plain, path


def test_jpeg_compressed_dicom_reads_with_the_extra(tmp_path):
    pytest.importorskip("pylibjpeg", reason="compressed DICOM needs the extra: pip install 'calibprompt[dicom]'")
    pytest.importorskip("openjpeg", reason="JPEG 2000 needs pylibjpeg-openjpeg: pip install 'calibprompt[dicom]'")
    from pydicom import dcmread

    plain, path = _compressed(tmp_path, "JPEG2000Lossless")
    assert dcmread(path).file_meta.TransferSyntaxUID.is_compressed
    assert path.stat().st_size < plain.stat().st_size
    np.testing.assert_array_equal(dicom_to_uint8(path.read_bytes()), dicom_to_uint8(plain.read_bytes()))


def test_undecodable_syntax_names_the_extra(tmp_path):
    from pydicom import dcmread
    from pydicom.uid import JPEGLSLossless

    plain = write_dicom(tmp_path / "plain.dcm", np.zeros((8, 8), np.uint16), bits_stored=12)
    ds = dcmread(plain)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # no installed plugin decodes JPEG-LS here
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\xd8not-a-codestream\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / "jls.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"calibprompt\[dicom\]"):
        dicom_to_uint8(path.read_bytes())


def test_jpeg_baseline_dicom_reads_with_the_extra(tmp_path):
    pytest.importorskip("libjpeg", reason="JPEG needs pylibjpeg-libjpeg: pip install 'calibprompt[dicom]'")
    import io

    from PIL import Image
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    y, x = np.mgrid[0:48, 0:64]
    grey = ((x * 3 + y * 2) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG", quality=95)
    ds = dcmread(write_dicom(tmp_path / "plain.dcm", grey))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / "jpeg.dcm"
    ds.save_as(path)
    decoded = dicom_to_uint8(path.read_bytes())
    reference = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert decoded.shape == grey.shape
    assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 2  # two JPEG decoders
