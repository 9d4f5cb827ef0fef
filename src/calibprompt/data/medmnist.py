"""MedMNIST ``.npz`` files (any 2D subset, sizes 28/64/128/224) as datasets.

Refs are ``"<split>/<index>"``; class names come from ``medmnist.INFO[flag]["label"]``, the flag
taken from ``name:`` or the file stem (``breastmnist_224.npz`` -> ``breastmnist``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .base import SPLITS, DataError, ImageDataset, Sample, hash_array
from .classes import choose_template, resolve_classnames
from .folder import check_test_fraction
from .images import scale_to_uint8

_STEM = re.compile(r"^(?P<flag>[a-z0-9]+?)(?:_(?P<size>28|64|128|224))?$")


def medmnist_info() -> dict[str, dict]:
    """``medmnist.INFO`` without importing the package: its ``__init__`` imports torch and
    torchvision (seconds), while the metadata lives in the dependency-free ``info.py``."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the medmnist package is not installed (pip install medmnist), so class "
                        "names cannot be looked up; install it or set data.classnames")
    info_path = Path(list(spec.submodule_search_locations)[0]) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_calibprompt_medmnist_info", info_path)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


def _identify(cfg: dict[str, Any], path: Path, where: str) -> tuple[str | None, int | None, dict | None]:
    """(flag, size from the name, INFO entry) from ``name:`` or else the file stem. Without
    ``classnames`` the flag must be a known MedMNIST flag, since the class names come from it."""
    try:
        known = medmnist_info()
    except DataError:
        if cfg.get("classnames") is None:
            raise
        return None, None, None
    for text in (cfg.get("name"), path.stem):
        match = _STEM.match(str(text or "").lower())
        if match and match["flag"] in known:
            return match["flag"], int(match["size"]) if match["size"] else None, known[match["flag"]]
    if cfg.get("classnames") is None:
        raise DataError(f"{where}: neither name {cfg.get('name')!r} nor the file name {path.name!r} is a "
                        f"MedMNIST flag (known: {sorted(known)}); set data.name to the flag (e.g. "
                        "breastmnist) or give data.classnames")
    return None, None, None


def parse_flag(text: str) -> tuple[str, int | None]:
    """``"breastmnist_64"`` -> ("breastmnist", 64)."""
    match = _STEM.match(text.lower())
    if not match:
        raise DataError(f"cannot read a MedMNIST flag from {text!r}; expected e.g. 'breastmnist' "
                        "or 'breastmnist_224' (set data.name to the flag)")
    size = match.group("size")
    return match.group("flag"), int(size) if size else None


class ArrayDataset(ImageDataset):
    """Images held in memory as uint8 arrays, one array per split."""

    source = "medmnist"

    def __init__(self, name: str, classnames: list[str], template: str,
                 images: dict[str, np.ndarray], labels: dict[str, np.ndarray], **kwargs) -> None:
        self.images = images
        # one rule for every split, from their common range: the same raw value is the same pixel in
        # train and test
        mode = pixel_mode(list(images.values()), f"{kwargs.get('location', name)}: {'/'.join(images)}_images")
        self.modes = {split: mode for split in images}
        samples = [Sample(f"{split}/{i}", int(label), split)
                   for split in images for i, label in enumerate(labels[split])]
        super().__init__(name, classnames, template, samples, **kwargs)

    def _array(self, sample: Sample) -> np.ndarray:
        split, _, index = sample.ref.partition("/")
        return self.images[split][int(index)]

    def _read(self, sample: Sample) -> Image.Image:
        array = to_uint8(self._array(sample), self.modes[sample.ref.partition("/")[0]])
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")

    def _hash(self, sample: Sample) -> str:
        return hash_array(np.ascontiguousarray(self._array(sample)))

    def _pixel_hash(self, sample: Sample) -> str:
        array = to_uint8(self._array(sample), self.modes[sample.ref.partition("/")[0]])
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        return hash_array(np.ascontiguousarray(array))


def pixel_mode(arrays, where: str) -> str:
    """How an image array's values become 8-bit pixels, decided once per array (so one dark image is
    not read differently from the rest):

    * ``uint8`` -- as stored;
    * ``float01`` -- floats within [0, 1]: x 255, rounded;
    * ``float255`` -- floats within [0, 255] (some above 1): rounded;
    * ``bool`` -- False/True: 0/255;
    * ``int255`` -- other integer types whose values lie in [0, 255]: cast;
    * ``bits<b>`` -- non-negative integers beyond 8 bits: x 255 / (2^b - 1), b the bit depth that holds the
      array's maximum (12-bit X-rays: b = 12; uint16 data using the full range: b = 16), so relative
      intensities are kept across the whole array;
    * ``range<lo>,<hi>`` -- integers with negative values: the array's own [min, max] mapped to 0..255.

    (A single 16-bit image *file* has no array-wide range; ``data.images`` min-max scales it.) Floats
    outside [0, 255], NaN or infinite values are refused, naming the array, dtype and range."""
    arrays = [a for a in (arrays if isinstance(arrays, (list, tuple)) else [arrays]) if a.size]
    if not arrays:
        return "uint8"
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        raise DataError(f"{where}: the image arrays have different dtypes {sorted(map(str, dtypes))}; store every "
                        "split with one dtype")
    array = arrays[0]
    if array.dtype == np.uint8:
        return "uint8"
    if array.dtype == np.bool_:
        return "bool"
    lo, hi = min(float(a.min()) for a in arrays), max(float(a.max()) for a in arrays)
    if np.issubdtype(array.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(f"{where}: {array.dtype} images hold NaN or infinite values; fix the array")
        if lo >= 0.0 and hi <= 1.0:
            return "float01"
        if lo >= 0.0 and hi <= 255.0:
            return "float255"
        raise DataError(f"{where}: {array.dtype} images range over [{lo:g}, {hi:g}]; calibprompt reads float "
                        "images in [0, 1] or [0, 255]. Rescale the array to one of these ranges")
    if np.issubdtype(array.dtype, np.integer):
        if lo >= 0 and hi <= 255:
            return "int255"
        return f"bits{max(8, int(hi).bit_length())}" if lo >= 0 else f"range{lo!r},{hi!r}"
    raise DataError(f"{where}: images of dtype {array.dtype} cannot be read as pixels; use uint8, uint16 or "
                    "float arrays")


def to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """One image as uint8 under its array's :func:`pixel_mode`."""
    if mode == "uint8":
        return array
    if mode == "bool":
        return array.astype(np.uint8) * 255
    if mode == "float01":
        return np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    if mode == "float255":
        return np.rint(array.astype(np.float64)).astype(np.uint8)
    if mode == "int255":
        return array.astype(np.uint8)
    if mode.startswith("bits"):
        full = float(2 ** int(mode[4:]) - 1)
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / full)), 0, 255).astype(np.uint8)
    lo, hi = (float(v) for v in mode[5:].split(","))
    return scale_to_uint8(array, lo, hi)


def open_medmnist(cfg: dict[str, Any], where: str = "data") -> ArrayDataset:
    path = Path(cfg["path"]).expanduser()
    if not path.is_file():
        raise DataError(f"{where}: MedMNIST file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{where}: cannot read {path} as a MedMNIST .npz file: {err}") from err
    splits = [s for s in SPLITS if f"{s}_images" in arrays]
    for split in splits:
        if f"{split}_labels" not in arrays:
            raise DataError(f"{path}: has {split}_images but no {split}_labels")
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{path}: expected arrays train_images/train_labels and test_images/"
                        f"test_labels (val_* optional); the file holds {sorted(arrays)}")

    flag, size, info = _identify(cfg, path, where)
    shapes = [arrays[f"{s}_images"].shape for s in splits]
    if (flag or "").endswith("3d") or any(len(sh) not in (3, 4) or (len(sh) == 4 and sh[-1] not in (1, 3))
                                          for sh in shapes):
        raise DataError(f"{path}: {flag or path.stem} holds 3D volumes (shape {shapes[0]}); only 2D "
                        "MedMNIST subsets (N, H, W) or (N, H, W, 3) are supported")
    if info is not None and "multi-label" in info.get("task", ""):
        raise DataError(f"{path}: {flag} is multi-label ({info['task']}); calibprompt trains "
                        "single-label classifiers. Convert it to one label per image (e.g. a CSV "
                        "manifest for one finding) first")

    images, labels = {}, {}
    for split in splits:
        lab = arrays[f"{split}_labels"]
        if lab.ndim == 2 and lab.shape[1] != 1:
            raise DataError(f"{path}: {split}_labels has shape {lab.shape}: one label per image "
                            "expected (multi-label data is not supported)")
        lab = lab.reshape(-1).astype(np.int64)
        if len(lab) != len(arrays[f"{split}_images"]):
            raise DataError(f"{path}: {split}_images and {split}_labels differ in length")
        images[split], labels[split] = arrays[f"{split}_images"], lab
        if size is not None and images[split].shape[1] != size:
            raise DataError(f"{path}: the name says size {size} but the images are "
                            f"{images[split].shape[1]}x{images[split].shape[2]}")

    if cfg.get("classnames") is None:
        keys = [str(i) for i in range(len(info["label"]))]
        classnames = resolve_classnames(keys, [info["label"][k] for k in keys], where)
    else:
        override = cfg["classnames"]
        count = len(override) if isinstance(override, (list, tuple, dict)) else None
        keys = [str(i) for i in range(count or 1 + int(max(lab.max() for lab in labels.values())))]
        classnames = resolve_classnames(keys, override, where)
    for split in splits:
        bad = np.flatnonzero((labels[split] < 0) | (labels[split] >= len(classnames)))
        if bad.size:
            raise DataError(f"{path}: {split} image {bad[0]} has label {labels[split][bad[0]]}, outside "
                            f"0..{len(classnames) - 1} ({len(classnames)} classes)")
        missing = sorted(set(range(len(classnames))) - set(labels[split].tolist()))
        if missing and split != "val":  # a thin val split only matters for val_shots (make_split)
            raise DataError(f"{path}: the {split} split has no images of class(es) {missing}")
    name = str(cfg.get("name") or path.stem)
    return ArrayDataset(
        name, classnames, choose_template(cfg.get("template"), name, where), images, labels,
        location=str(path), test_fraction=check_test_fraction(cfg.get("test_fraction"), True, where),
    )
