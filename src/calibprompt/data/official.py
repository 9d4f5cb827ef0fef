"""Reading what the official CalibPrompt code leaves in a dataset folder, safely.

Its first run writes ``preprocessed.pkl`` and ``split_fewshot/shot_<k>-seed_<s>.pkl`` beside
``images/``. The folder source ignores both (naming them). :func:`import_official_split` reads one
few-shot pickle -- a dict whose ``train`` list holds Dassl ``Datum`` objects (absolute ``impath``,
``label``, ``classname``) -- with a restricted unpickler that maps only that one class, by its module
path, to a plain record and refuses every other global, so no code in the file can run. Paths are mapped
into the user's dataset folder by the part after ``images/``.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

from .base import DataError, ImageDataset

OFFICIAL_CACHE_FILES = ("preprocessed.pkl", "split_fewshot")
DATUM = ("dassl.data.datasets.base_dataset", "Datum")


class _Datum:
    """A plain stand-in for Dassl's Datum: only its attributes (``_impath``, ``_label``, ...)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == DATUM:
            return _Datum
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only {'.'.join(DATUM)})")


def read_official_pickle(path: Path) -> dict:
    try:
        data = _RestrictedUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not an official CalibPrompt split pickle ({err}); it was not unpickled "
                        "further") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise DataError(f"{path}: expected a dict with a 'train' list of Datum records")
    return data


def import_official_split(path: str | Path, dataset: ImageDataset):
    """A :class:`~calibprompt.data.FewShotSplit` with exactly the official code's training shots (no
    validation shots; the dataset's whole test split), shots and seed read from the file name."""
    from .splits import FewShotSplit, _bind

    path = Path(path)
    data = read_official_pickle(path)
    refs = {s.ref for s in dataset.samples}
    train = []
    for i, datum in enumerate(data["train"]):
        state = getattr(datum, "__dict__", {})
        impath, label = str(state.get("_impath", "")), state.get("_label")
        ref = impath.replace("\\", "/").split("/images/", 1)[-1]
        if ref not in refs:
            raise DataError(f"{path}: shot {i} is {impath!r}, which is not in dataset {dataset.name!r} "
                            f"(looked for {ref!r} under its images/ folder)")
        if dataset.get(ref).label != label:
            raise DataError(f"{path}: shot {i} ({ref}) has label {label} there but {dataset.get(ref).label} here; "
                            "the class folders differ from the official run's")
        train.append(ref)
    match = re.match(r"shot_(\d+)-seed_(\d+)", path.stem)
    shots, seed = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    split = FewShotSplit(train=train, val=[], test=sorted(s.ref for s in dataset.samples_in("test")), shots=shots,
                         seed=seed, val_shots=0, val_source="none", test_fraction=None, dataset_name=dataset.name,
                         fingerprint=dataset.fingerprint(), classnames=list(dataset.classnames), dataset=dataset)
    _bind(split, dataset)
    return split
