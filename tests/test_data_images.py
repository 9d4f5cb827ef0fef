"""Image decoding: PNG, JPEG, 16-bit PNG, palette/alpha, and DICOM (rescale, window, MONOCHROME1)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calibprompt.data import DataError, open_dataset
from calibprompt.data.images import ImageReadError, dicom_to_uint8, read_image
from tests.test_data_helpers import noise, save, write_dicom


def test_png_and_jpeg_load_as_rgb(tmp_path):
    grey = save(tmp_path / "g.png", noise("g", channels=1))
    rgb = save(tmp_path / "c.jpg", noise("c"), quality=95)
    g = read_image(grey)
    assert g.mode == "RGB" and g.size == (12, 12)
    arr = np.asarray(g)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert np.array_equal(arr[..., 0], noise("g", channels=1))  # 8-bit grey kept exactly
    assert read_image(rgb).mode == "RGB"


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(1000, 3000, 64 * 4).reshape(16, 16).astype(np.uint16)
    path = save(tmp_path / "deep.png", values)
    assert Image.open(path).mode.startswith("I")
    arr = np.asarray(read_image(path))[..., 0]
    assert arr.min() == 0 and arr.max() == 255  # PIL's convert("RGB") would give all 255
    assert (np.diff(arr.ravel().astype(int)) >= 0).all()  # order of intensities kept
    assert len(np.unique(arr)) > 100


def test_alpha_and_palette_become_rgb(tmp_path):
    rgba = np.dstack([noise("a"), np.full((12, 12), 7, np.uint8)])
    out = read_image(save(tmp_path / "a.png", rgba))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), noise("a"))
    pal = Image.fromarray(noise("p")).convert("P")
    pal.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").mode == "RGB"


def test_dicom_window_rescale_and_monochrome1(tmp_path):
    raw = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)  # 12-bit ramp
    plain = dicom_to_uint8(write_dicom(tmp_path / "a.dcm", raw, bits_stored=12,
                                       window=(2048, 1024)).read_bytes())
    assert plain.dtype == np.uint8 and plain.shape == (16, 16)
    assert plain.flat[0] == 0 and plain.flat[-1] == 255  # outside the window: clamped
    mid = plain[raw == 2048][0]
    assert 120 <= mid <= 136  # window centre -> mid grey
    inside = (raw > 1540) & (raw < 2555)
    assert (np.diff(plain[inside].astype(int)) > 0).all()  # linear ramp inside the window

    inverted = dicom_to_uint8(write_dicom(tmp_path / "b.dcm", raw, bits_stored=12, window=(2048, 1024),
                                          photometric="MONOCHROME1").read_bytes())
    assert np.array_equal(inverted, 255 - plain)

    # rescale first: modality value = 2 * raw - 1000, window given in modality units
    rescaled = dicom_to_uint8(write_dicom(tmp_path / "c.dcm", raw, bits_stored=12, window=(3096, 2048),
                                          rescale=(2, -1000)).read_bytes())
    # same picture up to the +-0.5 offsets of DICOM's LINEAR window formula
    assert np.abs(rescaled.astype(int) - plain).max() <= 1
    assert rescaled.flat[0] == 0 and rescaled.flat[-1] == 255


def test_dicom_16bit_without_window_uses_full_range(tmp_path):
    raw = np.linspace(300, 900, 256).reshape(16, 16).astype(np.uint16)
    out = dicom_to_uint8(write_dicom(tmp_path / "d.dcm", raw).read_bytes())
    assert out.min() == 0 and out.max() == 255
    eight = noise("e", channels=1)
    assert np.array_equal(dicom_to_uint8(write_dicom(tmp_path / "e.dcm", eight).read_bytes()), eight)


def test_dicom_in_folder_and_extensionless(tmp_path):
    raw = np.linspace(0, 4000, 256).reshape(16, 16).astype(np.uint16)
    for cls in ("a", "b"):
        write_dicom(tmp_path / cls / "x.dcm", raw + (1 if cls == "b" else 0), bits_stored=12)
        write_dicom(tmp_path / cls / "IM0001", raw + (2 if cls == "b" else 3), bits_stored=12)
    ds = open_dataset({"source": "folder", "path": str(tmp_path)})
    assert sorted(s.ref for s in ds.samples) == ["a/IM0001", "a/x.dcm", "b/IM0001", "b/x.dcm"]
    image = ds.load(ds.samples[0])
    assert image.mode == "RGB" and image.size == (16, 16)


def test_corrupt_dicom_is_reported(tmp_path):
    path = write_dicom(tmp_path / "a" / "x.dcm", np.zeros((8, 8), np.uint16))
    path.write_bytes(path.read_bytes()[:-40])  # truncated pixel data
    with pytest.raises(ImageReadError):
        dicom_to_uint8(path.read_bytes())
    save(tmp_path / "b" / "y.png", noise("y"))
    with pytest.raises(DataError, match=r"a/x\.dcm"):
        open_dataset({"source": "folder", "path": str(tmp_path)})
