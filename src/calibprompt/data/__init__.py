"""Image datasets (folders, CSV/TSV manifests, MedMNIST files, DICOM, the paper's five datasets)
and deterministic few-shot splits. See docs/data.md for the config keys and formats."""

from .base import DataError, ImageDataset, Sample
from .classes import DEFAULT_TEMPLATE, default_template
from .paper import PAPER_DATASETS, PaperDataset, get_paper_dataset
from .prepare import PrepareReport, prepare
from .sources import DATA_CONFIG_KEYS, check_data_config, config_for_path, open_dataset
from .splits import FewShotSplit, holdout_test, make_split

__all__ = [
    "DATA_CONFIG_KEYS",
    "DEFAULT_TEMPLATE",
    "DataError",
    "FewShotSplit",
    "ImageDataset",
    "PAPER_DATASETS",
    "PaperDataset",
    "PrepareReport",
    "Sample",
    "check_data_config",
    "config_for_path",
    "default_template",
    "get_paper_dataset",
    "holdout_test",
    "make_split",
    "open_dataset",
    "prepare",
]
