"""The demo's config file and its few-shot splits: training shots from the micro model's downstream
pool (images its pretraining never saw), validation shots from the val split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calibprompt.settings import atomic_write_json

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DEMO_KEYS = ("dataset", "seeds", "pretrain", "run", "reference", "methods", "eval_on")


def load_demo_config(path: str | Path | None = None) -> dict:
    """The demo config (``configs/demo.yaml`` when ``path`` is None), checked for unknown keys."""
    from calibprompt.config import ConfigError, yaml_load

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"demo config {path} does not exist")
    cfg = yaml_load(path.read_text()) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if path != DEFAULT_CONFIG:  # a user's file may leave keys out: fill them from the default
        base = yaml_load(DEFAULT_CONFIG.read_text())
        cfg = {**base, **cfg}
    unknown = sorted(set(cfg) - set(DEMO_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown demo key(s) {unknown}; valid keys: {list(DEMO_KEYS)}")
    labels = [m.get("label") for m in cfg["methods"]]
    if len(set(labels)) != len(labels) or not all(labels):
        raise ConfigError(f"{path}: every method needs a distinct label, got {labels}")
    return cfg


def parse_seeds(value: Any) -> list[int]:
    """``5`` -> [1..5]; ``"1,3,7"`` or a list -> those seeds."""
    if isinstance(value, (list, tuple)):
        seeds = [int(v) for v in value]
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        seeds = list(range(1, int(value) + 1))
    else:
        seeds = [int(v) for v in str(value).split(",") if v.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a count or a list of distinct integers, got {value!r}")
    return seeds


def resolve_dataset(spec: str, quiet: bool = False) -> tuple[dict, bool]:
    """``data:`` config for ``spec`` (a MedMNIST flag, a data YAML, a folder, a CSV or an .npz path)
    and whether it is a MedMNIST flag."""
    from calibprompt.config import yaml_load
    from calibprompt.data import config_for_path
    from calibprompt.pretrain import medmnist_data_cfg, task_text

    path = Path(spec).expanduser()
    if not path.exists() and "/" not in spec and not spec.endswith((".yaml", ".yml", ".npz")):
        return medmnist_data_cfg(spec.lower(), quiet=quiet), True
    if path.suffix.lower() in (".yaml", ".yml"):
        loaded = yaml_load(path.read_text()) or {}
        data = loaded.get("data", loaded) if isinstance(loaded, dict) else None
        if not isinstance(data, dict) or "source" not in data:
            raise ValueError(f"{path}: expected a data: section with source and path (see docs/data.md)")
        return dict(data), False
    data = config_for_path(path)
    if data["source"] == "medmnist":
        data.setdefault("template", task_text(path.stem).zero_shot)
    return data, False


def _restricted(dataset, train_samples: list):
    """A view of ``dataset`` whose train split is only ``train_samples`` (refs unchanged)."""
    from calibprompt.data import ImageDataset

    keep = set(s.ref for s in train_samples)
    samples = [s for s in dataset.samples if s.split != "train" or s.ref in keep]

    class _View(ImageDataset):
        source = dataset.source

        def _read(self, sample):
            return dataset.load(sample.ref)

        def _hash(self, sample):
            return dataset.content_hash(sample.ref)

        def _pixel_hash(self, sample):
            return dataset.pixel_hash(sample.ref)

    return _View(dataset.name, dataset.classnames, dataset.template, samples, location=dataset.location,
                 test_fraction=dataset.test_fraction)


def write_splits(dataset, seeds: list[int], shots: int, val_shots: int, folder: Path,
                 eval_on: str = "test") -> dict[int, Path]:
    """One split file per seed: training shots from the micro model's downstream pool, validation
    shots from the val split (or, without one, the next images of the pool), and as evaluation set the
    whole test split, or with ``eval_on="val"`` the val images that are not validation shots (for
    investigations and tuning that must not look at the test split)."""
    from calibprompt.data import make_split
    from calibprompt.pretrain import downstream_pool

    if not dataset.has_split:
        raise ValueError(f"dataset {dataset.name!r} has no train/test split; the demo needs one "
                         "(use a folder with train/ and test/, or a MedMNIST file)")
    if eval_on not in ("test", "val"):
        raise ValueError(f"eval_on must be 'test' or 'val', got {eval_on!r}")
    if eval_on == "val" and not dataset.samples_in("val"):
        raise ValueError(f"dataset {dataset.name!r} has no val split to evaluate on")
    view = _restricted(dataset, downstream_pool(dataset))
    out = {}
    for seed in seeds:
        split = make_split(view, shots=shots, seed=seed, val_shots=val_shots)
        data = split.to_dict()
        data["fingerprint"] = dataset.fingerprint()
        if eval_on == "val":
            used = {item["ref"] for item in data["val"]}
            data["test"] = [{"ref": s.ref, "label": s.label, "sha256": dataset.content_hash(s)}
                            for s in dataset.samples_in("val") if s.ref not in used]
        data["note"] = ("training shots from the downstream pool that micro pretraining never saw; "
                        f"validation shots from the {split.val_source} split; evaluation: "
                        + ("the whole test split" if eval_on == "test" else "val images that are not validation shots"))
        path = folder / f"{dataset.name}-seed{seed}{'' if eval_on == 'test' else '-evalval'}.json"
        atomic_write_json(path, data)
        out[seed] = path
    return out
