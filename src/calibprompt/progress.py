"""What long work tells the user, and how: progress, one-time notes, and folder locks.

* :func:`progress` gives a progress reporter. On a terminal it is a tqdm bar; when stderr is not a
  terminal (a log file, CI, a pipe) it writes plain lines -- one when work starts, then at most one
  every ``LINE_SECONDS`` seconds and at every 25% -- never carriage-return redraws. ``enabled=False``
  (``--quiet``) silences it. A Python caller can pass ``callback(desc, done, total)`` instead.
* :func:`note` shows a run-time note once per process (the same text is not repeated), through the
  ``calibprompt`` logger, on stderr by default; ``calibprompt.cli`` routes library warnings here so a
  user sees ``calibprompt: note: ...`` and not a Python source line.
* :func:`folder_lock` takes an exclusive lock on an output folder; a second process fails at once with
  a message naming the holder's pid.
* :func:`folder_log` copies everything the ``calibprompt`` logger says while a run or sweep works
  (progress lines, notes, debug detail) into ``log.txt`` in its folder.

Library code never prints: progress lines and messages are records of the one ``calibprompt`` logger
(INFO for progress and status, WARNING for notes, DEBUG for detail). The CLI shows them on stderr at
the level chosen by ``-v`` / ``-q`` / ``--log-level``; a Python caller configures ``logging`` as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("calibprompt")
LINE_SECONDS = 10.0
ProgressCallback = Callable[[str, int, int], None]
_callback: ProgressCallback | None = None  # set by the API user or the CLI for the whole process
console_level = logging.INFO  # what the user sees on stderr (the CLI's -v / -q / --log-level); above INFO: no bars


def set_progress_callback(callback: ProgressCallback | None) -> None:
    """Route every progress report of this process to ``callback(desc, done, total)`` (None: default)."""
    global _callback
    _callback = callback


class _Lines:
    """Plain-line progress for non-terminals, as INFO records: start, every LINE_SECONDS, every 25%, the end."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = max(int(total), 0), desc, 0
        self.last = time.monotonic()
        self.quarter = 0
        self._line()

    def _line(self) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        log.info("%s: %d/%d%s", self.desc, self.done, self.total, pct)

    def update(self, n: int = 1) -> None:
        self.done += n
        quarter = 4 * self.done // self.total if self.total else 0
        now = time.monotonic()
        if quarter > self.quarter or now - self.last >= LINE_SECONDS:
            self.quarter, self.last = quarter, now
            if self.done < self.total:
                self._line()

    def set_postfix(self, **_kwargs) -> None:  # tqdm's API; lines show counts only
        pass

    def write(self, text: str) -> None:
        log.info(text)

    def close(self) -> None:
        self._line()


class _Callback:
    def __init__(self, total: int, desc: str, callback: ProgressCallback):
        self.total, self.desc, self.done, self.callback = total, desc, 0, callback
        callback(desc, 0, total)

    def update(self, n: int = 1) -> None:
        self.done += n
        self.callback(self.desc, self.done, self.total)

    def set_postfix(self, **_kwargs) -> None:
        pass

    def write(self, text: str) -> None:
        note(text)

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True, callback: ProgressCallback | None = None, **tqdm_kwargs):
    """A reporter with ``update(n)``, ``set_postfix(...)``, ``write(text)`` and ``close()``, or None when
    disabled (callers check ``if bar is not None``)."""
    callback = callback or _callback
    if callback is not None:
        return _Callback(total, desc, callback)
    if not enabled or console_level > logging.INFO:
        return None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, **tqdm_kwargs)
    return _Lines(total, desc)


_seen: set[str] = set()


def note(text: str, key: str | None = None) -> None:
    """Tell the user something once per process: repeats of the same ``key`` (default: the text) are
    dropped."""
    key = key or text
    if key in _seen:
        return
    _seen.add(key)
    log.warning(text)


LOG_FILE = "log.txt"


@contextlib.contextmanager
def folder_log(folder: str | os.PathLike, level: int = logging.DEBUG) -> Iterator[Path]:
    """Append every ``calibprompt`` record at ``level`` or above to ``folder/log.txt`` (time-stamped)
    while the block runs. The logger is opened to ``level`` for the block; a Python caller without
    logging handlers still sees notes (WARNING) on stderr, as before."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / LOG_FILE, mode="a", encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous, propagate = log.level, log.propagate
    threshold = log.getEffectiveLevel()
    forward = None
    if threshold > level:
        # Open the logger to ``level`` for the file, but hand the application's handlers (and logging's
        # last resort) only what they saw before: records below the old level must not leak to them.
        log.setLevel(level)
        if propagate:
            forward = _Forward(threshold, last_resort=not log.hasHandlers())
            log.addHandler(forward)
            log.propagate = False
    log.addHandler(handler)
    try:
        yield folder / LOG_FILE
    finally:
        log.removeHandler(handler)
        handler.close()
        if forward is not None:
            log.removeHandler(forward)
        log.setLevel(previous)
        log.propagate = propagate


class _Forward(logging.Handler):
    """Passes records at or above the logger's former level on to the root logger's handlers, or, where
    nothing handled calibprompt's records before (a Python caller without logging set up), to logging's
    last resort (notes on stderr), as before the file handler was added."""

    def __init__(self, threshold: int, last_resort: bool) -> None:
        super().__init__(threshold)
        self.last_resort = last_resort

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if root.handlers:
            if not root.disabled and root.filter(record):
                root.callHandlers(record)
        elif self.last_resort and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


class FolderBusy(ValueError):
    """Another process holds the folder."""


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".lock") -> Iterator[None]:
    """Exclusive lock on ``folder`` (file ``name`` inside it, with the holder's pid beside it in
    ``name.pid``). A second process fails at once with :class:`FolderBusy` naming the holder."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    holder = folder / f"{name}.pid"
    lock = FileLock(str(folder / name), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        who = holder.read_text().strip() if holder.is_file() else "another process"
        raise FolderBusy(f"{folder} is in use by {who}; wait for it to finish or use another --out") from None
    try:
        holder.write_text(f"pid {os.getpid()}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()
