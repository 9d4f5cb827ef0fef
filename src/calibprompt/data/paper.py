"""The paper's five datasets (docs/method.md §7.2-7.3): names, class order, prompt text, templates,
and opening the prepared layout ``<root>/<folder>/images/{train,test}/<class_folder>/``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .base import DataError
from .classes import read_classnames_file, resolve_classnames
from .files import FileDataset
from .folder import build_file_dataset, find_classnames_file, scan_folder

_HE_BACKBONES = ("PLIP", "QuiltNet")
_CXR_BACKBONES = ("MedCLIP", "BiomedCLIP")


@dataclass(frozen=True)
class PaperDataset:
    name: str  # our name, used in configs (`name: Kather`)
    official: str  # the dataset class name in the official code
    folder: str  # folder under the data root, as in BAPLe/CalibPrompt
    modality: str
    backbones: tuple[str, ...]
    classes: tuple[tuple[str, str], ...]  # (class folder, prompt text), label order
    template: str
    download: str
    raw_layout: str  # what `prepare` expects under --source
    split_recipe: str

    @property
    def class_folders(self) -> list[str]:
        return [folder for folder, _ in self.classes]

    @property
    def classnames(self) -> list[str]:
        return [text for _, text in self.classes]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = self.classnames
        out["class_folders"] = self.class_folders
        out["backbones"] = list(self.backbones)
        return out


PAPER_DATASETS: dict[str, PaperDataset] = {d.name: d for d in (
    PaperDataset(
        "COVID", "Covid", "covid", "chest X-ray", _CXR_BACKBONES,
        (("covid", "covid"), ("normal", "normal")),
        "A chest X-ray image of {} patient",
        "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
        "COVID-19_Radiography_Dataset/ with COVID/images/COVID-<n>.png and Normal/images/Normal-<n>.png "
        "(older releases without the images/ level are accepted)",
        "COVID and Normal only; per class (covid, then normal) files sorted by number, then "
        "random.sample(files, n // 2) -> train, rest -> test, after random.seed(0)",
    ),
    PaperDataset(
        "RSNA18", "RSNA18", "rsna18", "chest X-ray", _CXR_BACKBONES,
        (("lung_opacity", "lung opacity"),
         ("no_lung_opacity_not_normal", "no lung opacity, not normal"),
         ("normal", "normal")),
        "A chest X-ray image of {} patient",
        "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
        "stage_2_detailed_class_info.csv and stage_2_train_images/<patientId>.dcm (directly under "
        "--source or under --source/unprocessed/)",
        "sklearn train_test_split(csv rows, test_size=0.2, random_state=42); each DICOM saved as "
        "<patientId>.jpg. Rows repeat patient ids, so one image can land in train and test "
        "(recipe 'grouped': split unique patients instead)",
    ),
    PaperDataset(
        "Kather", "KatherColon", "kather", "H&E histopathology (colorectal)", _HE_BACKBONES,
        (("ADI", "adipose tissue"), ("BACK", "background"), ("DEB", "debris"),
         ("LYM", "lymphocytes"), ("MUC", "mucus"), ("MUS", "smooth muscle"),
         ("NORM", "normal colon mucosa"), ("STR", "cancer-associated stroma"),
         ("TUM", "colorectal adenocarcinoma epithelium")),
        "An H&E image of {}.",
        "https://zenodo.org/records/1214456 (NCT-CRC-HE-100K.zip, CRC-VAL-HE-7K.zip)",
        "NCT-CRC-HE-100K/<CLASS>/*.tif and CRC-VAL-HE-7K/<CLASS>/*.tif",
        "train = NCT-CRC-HE-100K (100,000 patches); test = CRC-VAL-HE-7K (7,180 patches); "
        "resized to 224x224",
    ),
    PaperDataset(
        "PanNuke", "PanNuke", "pannuke", "H&E histopathology (19 tissues)", _HE_BACKBONES,
        (("benign", "benign"), ("malignant", "malignant")),
        "An H&E image patch of {} skin tissue.",
        "https://warwick.ac.uk/fac/cross_fac/tia/data/pannuke (fold_1.zip, fold_2.zip, fold_3.zip)",
        "'Fold k/images/foldk/images.npy', 'Fold k/images/foldk/types.npy', 'Fold k/masks/foldk/masks.npy' "
        "for k = 1, 2, 3; or PLIP's patch dump of <tissue>_<benign|malignant>_<n>.png files",
        "PLIP binary labels (malignant: >= 10 neoplastic nuclei and > 30% of nuclei; benign: none), "
        "then stratified train_test_split(test_size=0.7, random_state=1); resized to 224x224",
    ),
    PaperDataset(
        "DigestPath", "DigestPath", "digestpath", "H&E histopathology (colonoscopy)", _HE_BACKBONES,
        (("benign", "benign"), ("malignant", "malignant")),
        "An H&E image patch of {} tissue.",
        "https://drive.google.com/drive/folders/1_19Nz7mPuLReYA60UAtcnsAotTqZk0Je "
        "(tissue-train-neg.zip, tissue-train-pos-v1.zip)",
        "PLIP's step-3 patch dump: negative/ and positive/ folders of "
        "<slide>_downsample=<d>_<n>.png (made by BAPLe's process_digestpath.py --step 1, 2, 3)",
        "70/30 random patch-level split: rows (negatives, then positives) permuted with "
        "RandomState(1); patches of one slide land in train and test (Q16; recipe 'grouped': "
        "slide-level split)",
    ),
)}


def get_paper_dataset(name: str) -> PaperDataset:
    """Look a paper dataset up by our name, official name or folder name (any case)."""
    wanted = str(name).lower()
    for spec in PAPER_DATASETS.values():
        if wanted in (spec.name.lower(), spec.official.lower(), spec.folder):
            return spec
    raise DataError(f"unknown paper dataset {name!r}; the paper datasets are {list(PAPER_DATASETS)}")


def find_dataset_dir(root: Path, spec: PaperDataset) -> Path:
    """``root/<folder>`` (or ``root/<Name>``), or ``root`` itself when it is the dataset folder."""
    for candidate in (root / spec.folder, root / spec.name, root / spec.official):
        if (candidate / "images").is_dir():
            return candidate
    if (root / "images" / "train").is_dir():
        return root
    raise DataError(
        f"paper dataset {spec.name}: no {root / spec.folder}/images/ folder. Expected "
        f"<path>/{spec.folder}/images/{{train,test}}/<class_folder>/ (run `calibprompt data prepare "
        f"{spec.name} --source RAW_DIR --out {root}` on the public download)"
    )


def open_paper(cfg: dict[str, Any], where: str = "data") -> FileDataset:
    if not cfg.get("name"):
        raise DataError(f"{where}: source 'paper' needs name: one of {list(PAPER_DATASETS)}")
    spec = get_paper_dataset(cfg["name"])
    folder = find_dataset_dir(Path(cfg["path"]).expanduser(), spec)
    image_root, splits, keys, entries, ignored = scan_folder(folder, where, require_split=True)
    if keys != spec.class_folders:
        raise DataError(
            f"{where}: {image_root} has class folders {keys}, but {spec.name} needs exactly "
            f"{spec.class_folders} (missing {sorted(set(spec.class_folders) - set(keys))}, "
            f"unexpected {sorted(set(keys) - set(spec.class_folders))})"
        )
    txt = find_classnames_file(folder, image_root)
    if txt is not None:
        found = read_classnames_file(txt)
        expected = dict(spec.classes)
        if found != expected:
            diff = {k: found.get(k) for k in sorted(set(found) | set(expected))
                    if found.get(k) != expected.get(k)}
            raise DataError(f"{txt} disagrees with the paper's class names for {spec.name} "
                            f"{expected}: {diff}. Fix the file, or use source: folder for other names")
    classnames = resolve_classnames(keys, cfg.get("classnames") or spec.classnames, where)
    return build_file_dataset(cfg, where, name=spec.name, classnames=classnames, entries=entries,
                              splits=splits, ignored=ignored, location=str(folder), source="paper")
