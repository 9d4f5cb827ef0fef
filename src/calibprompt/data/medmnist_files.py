"""Finding a MedMNIST ``.npz``: ``$CALIBPROMPT_DATA/medmnist/``, the medmnist package's folder, the
calibprompt cache, or a download through the ``medmnist`` package (online only, with a timeout)."""

from __future__ import annotations

import socket
from pathlib import Path

from calibprompt.settings import cache_dir, data_dir

ZENODO = "https://zenodo.org/records/10519652"


def find_medmnist(flag: str, download: bool = True, quiet: bool = False) -> Path:
    """Path of ``<flag>.npz``: ``$CALIBPROMPT_DATA/medmnist/``, then the medmnist package's folder
    (``~/.medmnist``), then the calibprompt cache; when absent everywhere and ``download``, the
    ``medmnist`` package downloads it (from Zenodo) into the cache. Raises FileNotFoundError with
    instructions when it cannot be found or fetched."""
    name = f"{flag}.npz"
    places = [data_dir() / "medmnist", Path.home() / ".medmnist", cache_dir() / "medmnist"]
    for place in places:
        if (place / name).is_file():
            return place / name
    target = cache_dir() / "medmnist"
    error = "downloading is disabled"
    if download:
        error = _download_medmnist(flag, target, quiet)
        if error is None and (target / name).is_file():
            return target / name
    searched = "\n".join(f"  {p / name}" for p in places)
    raise FileNotFoundError(
        f"MedMNIST file {name} not found. Looked in:\n{searched}\n"
        f"and could not download it ({error}). Either set CALIBPROMPT_DATA to a folder holding "
        f"medmnist/{name} (the project's CI uses ../shared/data), or copy {name} from {ZENODO} (MedMNIST v2, "
        f"CC BY 4.0) into {target}/, or connect to the internet and rerun (the medmnist package then "
        "downloads it)."
    )


def _download_medmnist(flag: str, target: Path, quiet: bool) -> str | None:
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        return "the medmnist package is not installed: pip install medmnist"
    if flag not in INFO:
        return f"{flag!r} is not a MedMNIST flag"
    target.mkdir(parents=True, exist_ok=True)
    if not quiet:
        from calibprompt.progress import log

        log.info("downloading %s.npz with the medmnist package into %s ...", flag, target)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        cls = getattr(medmnist, INFO[flag]["python_class"])
        cls(split="test", root=str(target), download=True)
    except Exception as err:  # noqa: BLE001 - offline machines fail in many ways; report one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        for partial in target.glob(f"{flag}*.npz*"):  # never leave half a download behind
            if not _complete_npz(partial):
                partial.unlink(missing_ok=True)
        return f"{type(err).__name__}: {first or 'the download failed (is the machine offline?)'}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _complete_npz(path: Path) -> bool:
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            return "test_images" in npz.files
    except Exception:  # noqa: BLE001 - unreadable means incomplete
        return False
