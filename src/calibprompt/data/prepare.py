"""``prepare``: turn a public raw download of a paper dataset into the layout
``<out>/<folder>/images/{train,test}/<class_folder>/`` + ``classnames.txt``, following the split
recipe of BAPLe's preprocessing scripts (which CalibPrompt uses). Nothing is downloaded.

Each recipe writes into a hidden staging folder that is renamed into place only when complete.
Afterwards the output is hashed: test images whose bytes also occur in train (and, where the raw
data says so, patients or slides present in both splits) are counted, warned about and recorded
in ``prepare.json``. Where the official scripts are only partly reproducible the recipe says so.

Why this module is long: one recipe per paper dataset (five), each a short function, plus the shared
copy/convert/verify steps they use; splitting them would scatter the recipes the docs describe together.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from calibprompt.settings import atomic_write_json, atomic_write_text, sha256_file

from .base import DataError
from .images import dicom_to_uint8, image_kind
from .paper import PaperDataset, get_paper_dataset

RECIPES = ("paper", "grouped")
SIZE = 224
Groups = dict[str, set[str]]  # split -> patient or slide ids


@dataclass
class PrepareReport:
    name: str
    path: str
    recipe: str
    counts: dict[str, dict[str, int]]
    duplicate_content: int  # test images whose exact bytes also occur in train
    shared_groups: int | None = None  # patients/slides with images in train and test
    group_kind: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare(name: str, source_dir: str | Path, out_root: str | Path, *, recipe: str = "paper",
            overwrite: bool = False) -> PrepareReport:
    """Build ``<out_root>/<folder>/`` for paper dataset ``name`` from its raw download.

    ``recipe="paper"`` reproduces the official split; ``"grouped"`` (RSNA18, DigestPath) keeps
    every patient/slide on one side. Raises ``DataError`` when the raw layout is not as expected.
    """
    spec = get_paper_dataset(name)
    source, out_root = Path(source_dir).expanduser(), Path(out_root).expanduser()
    if not source.is_dir():
        raise DataError(f"prepare {spec.name}: source folder {source} does not exist; "
                        f"expected {spec.raw_layout}")
    recipes = _RECIPES[spec.name]
    if recipe not in recipes:
        raise DataError(f"prepare {spec.name}: recipe must be one of {list(recipes)}, got {recipe!r}")
    final = out_root / spec.folder
    if final.exists() and not overwrite:
        raise DataError(f"{final} already exists; remove it or pass overwrite=True (--overwrite)")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_root, prefix=f".{spec.folder}.partial-"))
    try:
        for split in ("train", "test"):
            for folder in spec.class_folders:
                (staging / "images" / split / folder).mkdir(parents=True)
        groups, group_kind, notes = recipes[recipe](source, staging / "images", recipe)
        atomic_write_text(staging / "classnames.txt", "".join(f"{f} {t}\n" for f, t in spec.classes))
        report = _report(spec, staging, final, recipe, groups, group_kind, notes)
        atomic_write_json(staging / "prepare.json", {**report.to_dict(), "source": str(source)})
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if report.duplicate_content or report.shared_groups:
        warnings.warn(_leak_text(report), stacklevel=2)
    return report


def _leak_text(report: PrepareReport) -> str:
    parts = []
    if report.duplicate_content:
        parts.append(f"{report.duplicate_content} test image(s) have the same content as a train image")
    if report.shared_groups:
        parts.append(f"{report.shared_groups} {report.group_kind}(s) have images in both train and test")
    return f"{report.name} ({report.recipe} recipe): train/test leakage: " + "; ".join(parts)


def _report(spec: PaperDataset, staging: Path, final: Path, recipe: str, groups: Groups | None,
            group_kind: str | None, notes: list[str]) -> PrepareReport:
    counts: dict[str, dict[str, int]] = {}
    hashes: dict[str, list[str]] = {}
    for split in ("train", "test"):
        counts[split] = {}
        files = []
        for folder in spec.class_folders:
            found = sorted((staging / "images" / split / folder).iterdir())
            counts[split][folder] = len(found)
            files += found
        hashes[split] = _map(sha256_file, files)
    empty = [f"{s}/{c}" for s, per in counts.items() for c, n in per.items() if n == 0]
    if empty:
        raise DataError(f"prepare {spec.name}: no images ended up in {empty}; check the raw download")
    train = set(hashes["train"])
    duplicates = sum(1 for h in hashes["test"] if h in train)
    shared = len(groups["train"] & groups["test"]) if groups else None
    return PrepareReport(spec.name, str(final), recipe, counts, duplicates, shared, group_kind, notes)


def _map(fn: Callable, items: Iterable) -> list:
    items = list(items)
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(fn, items))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and image_kind(p) == "image")


def _save_224(image: Image.Image, target: Path) -> None:
    """BAPLe's resize: square images -> 224x224 (PIL's default bicubic). Non-square images (none in
    the five datasets) get the shorter side to 224 and a centre crop; the official crop offsets use
    the pre-resize size, which we do not copy."""
    if image.size != (SIZE, SIZE):
        w, h = image.size
        if w == h:
            image = image.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        else:
            scale = SIZE / min(w, h)
            image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
            image = image.crop((left, top, left + SIZE, top + SIZE))
    image.save(target)


def _copy_224(pair: tuple[Path, Path]) -> None:
    """Copy a file unchanged when it is already 224x224 (keeps its bytes), else resize it."""
    src, dst = pair
    with Image.open(src) as image:
        if image.size == (SIZE, SIZE):
            shutil.copyfile(src, dst)
        else:
            image.load()
            _save_224(image, dst)


# -- COVID ------------------------------------------------------------------------------------
def _covid(source: Path, out: Path, recipe: str) -> tuple[None, None, list[str]]:
    inner = source / "COVID-19_Radiography_Dataset"
    base = inner if inner.is_dir() else source
    rng = random.Random(0)  # the official script seeds once, then samples covid, then normal
    jobs = []
    for folder, raw in (("covid", "COVID"), ("normal", "Normal")):
        directory = base / raw / "images" if (base / raw / "images").is_dir() else base / raw
        if not directory.is_dir():
            raise DataError(f"prepare COVID: {directory} not found; "
                            f"expected {get_paper_dataset('COVID').raw_layout}")
        files = _images_in(directory)
        if not files:
            raise DataError(f"prepare COVID: {directory} holds no images")
        names = sorted((f.name for f in files), key=lambda n: _number(n, directory))
        train = set(rng.sample(names, len(names) // 2))
        jobs += [(directory / n, out / ("train" if n in train else "test") / folder / n) for n in names]
    _map(lambda pair: shutil.copyfile(*pair), jobs)
    return None, None, []


def _number(name: str, directory: Path) -> int:
    match = re.search(r"-(\d+)$", Path(name).stem)
    if not match:
        raise DataError(f"prepare COVID: {directory / name} is not named <Class>-<number>.png as in the "
                        "Kaggle release; the official split sorts files by that number")
    return int(match.group(1))


# -- RSNA18 -----------------------------------------------------------------------------------
_RSNA_CLASSES = {"Lung Opacity": "lung_opacity", "No Lung Opacity / Not Normal": "no_lung_opacity_not_normal",
                 "Normal": "normal"}


def _rsna18(source: Path, out: Path, recipe: str) -> tuple[Groups, str, list[str]]:
    from sklearn.model_selection import train_test_split

    base = source / "unprocessed" if (source / "unprocessed").is_dir() else source
    table, images = base / "stage_2_detailed_class_info.csv", base / "stage_2_train_images"
    if not table.is_file() or not images.is_dir():
        raise DataError(f"prepare RSNA18: expected {table} and the folder {images}")
    rows = []
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"patientId", "class"} <= set(reader.fieldnames or []):
            raise DataError(f"{table}: expected columns patientId,class; found {reader.fieldnames}")
        for row in reader:
            if row["class"] not in _RSNA_CLASSES:
                raise DataError(f"{table} line {reader.line_num}: unknown class {row['class']!r}; "
                                f"expected one of {list(_RSNA_CLASSES)}")
            rows.append((row["patientId"], _RSNA_CLASSES[row["class"]]))
    if recipe == "paper":  # over CSV rows, as the official script (a patient can be on both sides)
        parts = train_test_split(rows, test_size=0.2, random_state=42)
    else:
        unique = list(dict.fromkeys(rows))
        parts = train_test_split(unique, test_size=0.2, random_state=42)
    missing = [pid for pid, _ in rows if not (images / f"{pid}.dcm").is_file()]
    if missing:
        raise DataError(f"prepare RSNA18: {len(missing)} DICOM file(s) listed in {table.name} are missing "
                        f"from {images}, e.g. {missing[0]}.dcm")
    jpegs: dict[str, bytes] = {}
    for split, part in zip(("train", "test"), parts):
        for pid, folder in part:
            if pid not in jpegs:
                jpegs[pid] = _dicom_jpeg(images / f"{pid}.dcm")
            (out / split / folder / f"{pid}.jpg").write_bytes(jpegs[pid])
    groups = {split: {pid for pid, _ in part} for split, part in zip(("train", "test"), parts)}
    return groups, "patient", ["JPEG quality 75 (PIL default), as the official conversion"]


def _dicom_jpeg(path: Path) -> bytes:
    """The official conversion is ``Image.fromarray(ds.pixel_array).save(jpg)``: raw 8-bit values.
    Other bit depths go through calibprompt's DICOM conversion (the official one would fail)."""
    import io

    import pydicom

    data = path.read_bytes()
    try:
        array = pydicom.dcmread(io.BytesIO(data)).pixel_array
    except Exception as err:
        raise DataError(f"prepare RSNA18: cannot decode {path}: {err}") from err
    if array.dtype != np.uint8 or array.ndim != 2:
        array = dicom_to_uint8(data)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


# -- Kather -----------------------------------------------------------------------------------
def _kather(source: Path, out: Path, recipe: str) -> tuple[None, None, list[str]]:
    spec = get_paper_dataset("Kather")
    jobs = []
    for split, raw in (("train", "NCT-CRC-HE-100K"), ("test", "CRC-VAL-HE-7K")):
        directory = source / raw
        if not directory.is_dir():
            raise DataError(f"prepare Kather: {directory} not found; unzip NCT-CRC-HE-100K.zip and "
                            f"CRC-VAL-HE-7K.zip into {source}")
        found = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        if found != spec.class_folders:
            raise DataError(f"prepare Kather: {directory} has class folders {found}, "
                            f"expected {spec.class_folders}")
        for folder in spec.class_folders:
            jobs += [(f, out / split / folder / f.name) for f in _images_in(directory / folder)]
    _map(_copy_224, jobs)
    return None, None, ["224x224 patches are copied byte for byte; others are resized to 224x224"]


# -- PanNuke ----------------------------------------------------------------------------------
_PLIP_PANNUKE = re.compile(r"^(?P<tissue>.+)_(?P<label>benign|malignant)_(?P<n>\d+)\.png$")


def _pannuke(source: Path, out: Path, recipe: str) -> tuple[None, None, list[str]]:
    from sklearn.model_selection import train_test_split

    folds = [(source / f"Fold {k}" / "images" / f"fold{k}", source / f"Fold {k}" / "masks" / f"fold{k}")
             for k in (1, 2, 3)]
    if all((i / "images.npy").is_file() for i, _ in folds):
        items, note = _pannuke_from_folds(folds), "labels computed from the fold masks (PLIP thresholds)"
    else:
        files = [p for p in source.rglob("*.png") if _PLIP_PANNUKE.match(p.name)]
        if not files:
            raise DataError(f"prepare PanNuke: found neither the folds ({folds[0][0]}/images.npy, ...) "
                            f"nor PLIP-named patches <tissue>_<benign|malignant>_<n>.png under {source}")
        items, note = _pannuke_from_dump(files), "labels and order from the PLIP patch dump file names"
    labels = [label for _, label, _ in items]
    train, test = train_test_split(list(range(len(items))), test_size=0.7, stratify=labels, random_state=1)

    def write(job: tuple[int, str]) -> None:
        index, split = job
        file_name, label, load = items[index]
        _save_224(Image.fromarray(load()), out / split / label / file_name)

    _map(write, [(i, "train") for i in train] + [(i, "test") for i in test])
    return None, None, [note]


def _pannuke_from_folds(folds: list[tuple[Path, Path]]) -> list[tuple[str, str, Callable]]:
    """PLIP's labelling: per image count nuclei per channel (unique instance ids - 1) of the
    uint8 masks; drop images without nuclei; malignant if >= 10 neoplastic and > 30% of all,
    benign if none. Order: all malignant, then all benign (the CSV order the split runs on)."""
    malignant, benign = [], []
    for image_dir, mask_dir in folds:
        if not (image_dir / "types.npy").is_file() or not (mask_dir / "masks.npy").is_file():
            raise DataError(f"prepare PanNuke: expected {image_dir / 'types.npy'} and "
                            f"{mask_dir / 'masks.npy'}")
        images = np.load(image_dir / "images.npy", mmap_mode="r")
        masks = np.load(mask_dir / "masks.npy", mmap_mode="r")
        types = np.load(image_dir / "types.npy")
        if not len(images) == len(masks) == len(types):
            raise DataError("prepare PanNuke: images, masks and types differ in length in "
                            f"{image_dir.parent.parent}")
        for i in range(len(images)):
            mask = np.asarray(masks[i]).astype(np.uint8)
            if not mask[..., 0:5].any():
                continue  # purely background
            cells = [len(np.unique(mask[..., j])) - 1 for j in range(6)]
            tissue = str(types[i]).lower().replace("_", " ")
            load = (lambda arr=images, k=i: np.asarray(arr[k]).astype(np.uint8))
            if cells[0] >= 10 and cells[0] / sum(cells) > 0.3:
                malignant.append((tissue, load))
            elif cells[0] == 0:
                benign.append((tissue, load))
    return ([(f"{t}_malignant_{n:04d}.png", "malignant", f) for n, (t, f) in enumerate(malignant)]
            + [(f"{t}_benign_{n:04d}.png", "benign", f) for n, (t, f) in enumerate(benign)])


def _pannuke_from_dump(files: list[Path]) -> list[tuple[str, str, Callable]]:
    by_label: dict[str, list[tuple[int, Path]]] = {"malignant": [], "benign": []}
    for path in files:
        match = _PLIP_PANNUKE.match(path.name)
        by_label[match["label"]].append((int(match["n"]), path))
    items = []
    for label in ("malignant", "benign"):
        numbered = sorted(by_label[label])
        if [n for n, _ in numbered] != list(range(len(numbered))):
            raise DataError(f"prepare PanNuke: the {label} patches are not numbered 0..{len(numbered) - 1} "
                            "without gaps or repeats; the paper's split needs PLIP's complete dump")
        items += [(p.name, label, partial(_read_rgb, p)) for _, p in numbered]
    return items


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- DigestPath -------------------------------------------------------------------------------
_PLIP_DIGEST = re.compile(r"^(?P<slide>.+)_downsample=(?P<d>\d+)_(?P<n>\d+)\.png$")


def _digestpath(source: Path, out: Path, recipe: str) -> tuple[Groups, str, list[str]]:
    candidates = [source, source / "images", *sorted(source.glob("processed/*/step_2_*/images"))]
    dump = next((c for c in candidates if (c / "negative").is_dir() and (c / "positive").is_dir()), None)
    if dump is None:
        hint = ""
        if (source / "tissue-train-neg").is_dir() or (source / "tissue-train-pos-v1").is_dir():
            hint = (" This is the raw slide download: calibprompt does not re-implement PLIP's patch "
                    "extraction, whose output depends on Pillow's JPEG decoder and resampler. Run "
                    "BAPLe's process_digestpath.py --step 1, 2 and 3 in that folder first.")
        raise DataError(f"prepare DigestPath: no negative/ and positive/ patch folders under {source}."
                        + hint)
    rows: list[tuple[str, Path, str]] = []  # (class folder, file, slide); negatives first
    for raw, folder in (("negative", "benign"), ("positive", "malignant")):
        numbered = []
        for path in _images_in(dump / raw):
            match = _PLIP_DIGEST.match(path.name)
            if not match:
                raise DataError(f"prepare DigestPath: {path} is not named <slide>_downsample=<d>_<n>.png")
            numbered.append((int(match["n"]), path, match["slide"]))
        numbered.sort()
        if [n for n, _, _ in numbered] != list(range(len(numbered))):
            raise DataError(f"prepare DigestPath: the {raw} patches are not numbered 0..{len(numbered) - 1}; "
                            "the paper's split needs PLIP's complete dump")
        rows += [(folder, path, slide) for _, path, slide in numbered]
    if recipe == "paper":  # df.sample(frac=1, random_state=1), then the first 70% -> train
        order = np.random.RandomState(1).permutation(len(rows))
        cut = int(len(rows) * 0.7)
        side = {int(i): ("train" if k < cut else "test") for k, i in enumerate(order)}
    else:
        slides = sorted({slide for _, _, slide in rows})
        positive = sorted({slide for folder, _, slide in rows if folder == "malignant"})
        negative = [s for s in slides if s not in set(positive)]
        rng, train_slides = np.random.RandomState(1), set()
        for group in (negative, positive):
            group = list(group)
            rng.shuffle(group)
            train_slides |= set(group[: int(len(group) * 0.7)])
        side = {i: ("train" if slide in train_slides else "test") for i, (_, _, slide) in enumerate(rows)}
    _map(_copy_224, [(path, out / side[i] / folder / path.name) for i, (folder, path, _) in enumerate(rows)])
    groups: Groups = {"train": set(), "test": set()}
    for i, (_, _, slide) in enumerate(rows):
        groups[side[i]].add(slide)
    return groups, "slide", ["patches from PLIP's dump (patch extraction not re-implemented)"]


_RECIPES: dict[str, dict[str, Callable]] = {
    "COVID": {"paper": _covid},
    "RSNA18": {"paper": _rsna18, "grouped": _rsna18},
    "Kather": {"paper": _kather},
    "PanNuke": {"paper": _pannuke},
    "DigestPath": {"paper": _digestpath, "grouped": _digestpath},
}
