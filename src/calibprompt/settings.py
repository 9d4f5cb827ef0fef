"""Where things live (shared data, caches) and the two file primitives every layer relies on:
atomic writes and content hashing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

#: the two metric and loss conventions: correct behaviour, and the official code's (docs/parity.md)
CONVENTIONS = ("standard", "reference")
DATA_ENV = "CALIBPROMPT_DATA"
CACHE_ENV = "CALIBPROMPT_CACHE"


def data_dir() -> Path:
    """Folder of the shared test data: ``$CALIBPROMPT_DATA``, else ``../shared/data``."""
    return Path(os.environ.get(DATA_ENV, "../shared/data")).expanduser()


def shared_file(relative: str) -> Path:
    """Path of a file inside the shared data folder; raises FileNotFoundError naming the setting."""
    path = data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Point the environment variable {DATA_ENV} at the folder that holds "
            f"'{relative}' (CI sets it to ../shared/data)."
        )
    return path


def cache_dir() -> Path:
    """Root of calibprompt's persistent cache: ``$CALIBPROMPT_CACHE``, else ``~/.cache/calibprompt``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "calibprompt"
    )
    return Path(root)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the umask like open() does
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN and infinities become null, so any JSON reader accepts the file)."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return strict_json(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def registrar(table: dict, what: str):
    """A class decorator that adds a class to ``table`` under its ``name`` (unique, non-empty): the one
    way every registry of the package (methods, calibrators) is filled."""

    def register(cls):
        if not getattr(cls, "name", "") or cls.name in table:
            raise ValueError(f"{what} class {cls.__name__} needs a unique name (got {getattr(cls, 'name', '')!r})")
        table[cls.name] = cls
        return cls

    register.__doc__ = f"Class decorator: add a {what} class to the registry under ``cls.name``."
    return register


def slug(text: str, max_len: int = 80) -> str:
    """A file-name-safe form of a label: lower case, runs of other characters as one "-"."""
    import re

    return re.sub(r"[^a-z0-9.=]+", "-", text.lower()).strip("-")[:max_len] or "x"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
