"""Which images the micro model may learn from: per source dataset its train part minus a reserved
downstream pool (the demo's few-shot shots), never the test split."""

from __future__ import annotations

from typing import Sequence

import torch

from calibprompt.data.medmnist_files import find_medmnist
from calibprompt.data.splits import content_rank
from calibprompt.pretrain.captions import task_text


def medmnist_data_cfg(flag: str, download: bool = True, quiet: bool = False) -> dict:
    """The ``data:`` section for MedMNIST subset ``flag`` with the micro model's zero-shot template."""
    return {"source": "medmnist", "path": str(find_medmnist(flag, download, quiet)), "name": flag,
            "template": task_text(flag).zero_shot}


def train_part(dataset) -> list:
    """The images of ``dataset`` that are not test images: its train split, or for an unsplit
    source everything outside the deterministic test hold-out (``data.test_fraction``)."""
    if dataset.has_split:
        return dataset.samples_in("train")
    from calibprompt.data import holdout_test

    if dataset.test_fraction is None:
        raise ValueError(f"dataset {dataset.name!r} has no train/test split; set data.test_fraction so "
                         "the test images can be kept out of pretraining")
    return holdout_test(dataset, dataset.test_fraction)[0]


def reserve_size(n: int) -> int:
    """Images of a class (of ``n`` in the train part) reserved for the downstream few-shot pool:
    a quarter, at most 64, and at least half of a small class up to 16 (so 8 shots always fit)."""
    return min(64, max(n // 4, min(16, n // 2)))


def downstream_pool(dataset) -> list:
    """Per class, :func:`reserve_size` images of the train part, chosen by a seed-independent content
    hash. They are kept out of pretraining so the demo's few-shot training shots are new to the model."""
    pool = []
    train = train_part(dataset)
    for label in range(dataset.num_classes):
        members = sorted((s for s in train if s.label == label),
                         key=lambda s: (content_rank("micro-reserve", dataset.content_hash(s)), s.ref))
        pool += members[: reserve_size(len(members))]
    return pool


def pretrain_samples(dataset) -> list:
    """Train-part images minus the downstream pool (and minus any image whose content equals a
    reserved or test image)."""
    reserved = {dataset.content_hash(s) for s in downstream_pool(dataset)}
    test_hashes = {dataset.content_hash(s) for s in dataset.samples_in("test")} if dataset.has_split else set()
    blocked = reserved | test_hashes
    return [s for s in train_part(dataset) if dataset.content_hash(s) not in blocked]


def _image_tensor(dataset, samples: Sequence, transform) -> torch.Tensor:
    return torch.stack([transform(dataset.load(s)) for s in samples]) if samples else torch.empty(0)


def _subsample(dataset, samples: list, cap: int) -> list:
    out = []
    for label in range(dataset.num_classes):
        members = sorted((s for s in samples if s.label == label),
                         key=lambda s: (content_rank("micro-subsample", dataset.content_hash(s)), s.ref))
        out += members[:cap]
    return out
