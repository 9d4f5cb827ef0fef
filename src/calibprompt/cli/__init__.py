"""The ``calibprompt`` command. Each command group lives in its own module with a
``register(subparsers)`` function that adds its sub-commands and sets ``func`` on them.

Exit codes: 0 success; 1 a run-time failure (a disk that is full or read-only, an error inside a
library); 2 a usage or input error (a bad config key or value, a missing or damaged file, a folder in
use). Errors are one line on stderr naming the file, key or flag and the fix; ``--debug`` shows the
traceback instead. Library warnings are shown once each as ``calibprompt: note: ...``. Every
sub-command takes ``-q`` / ``-v`` / ``--log-level`` and ``--json`` (``cli/output.py``)."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback
import warnings
from pathlib import Path

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = ["run", "robustness", "deploy", "models", "data", "experiments", "demo", "config"]
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def build_parser() -> argparse.ArgumentParser:
    from calibprompt import __version__

    parser = argparse.ArgumentParser(
        prog="calibprompt",
        description="Calibration-aware prompt learning for medical vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"calibprompt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"calibprompt.cli.{name}").register(sub)
    _add_common_flags(sub)
    return parser


def _add_common_flags(sub) -> None:
    """-v / -q / --log-level / --json on every leaf sub-command (``calibprompt data inspect -v``). A group
    (``data``, ``config``) does not take them: argparse would let its action's defaults overwrite them."""
    from calibprompt.cli.output import add_common

    for command in set(sub.choices.values()):
        nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
        if nested:
            _add_common_flags(nested[0])
        else:
            add_common(command)


def _configure_logging(level: int):
    """The ``calibprompt`` logger on stderr at ``level``: progress and status lines as they are, notes as
    ``calibprompt: note: ...`` (once per text), debug detail as ``calibprompt: debug: ...``; library
    warnings become notes, never a Python source line."""
    import calibprompt.progress as progress

    logger = logging.getLogger("calibprompt")
    before = (logger.level, progress.console_level, warnings.showwarning)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    handler.setLevel(level)
    logger.addHandler(handler)  # records still propagate: an application's own logging sees them too
    logger.setLevel(level)
    progress.console_level = level
    warnings.showwarning = lambda message, *_args, **_kwargs: progress.note(str(message))

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        progress.console_level = before[1]
        warnings.showwarning = before[2]

    return restore


class _Formatter(logging.Formatter):
    PREFIX = {logging.DEBUG: "calibprompt: debug: ", logging.INFO: ""}

    def format(self, record: logging.LogRecord) -> str:
        prefix = self.PREFIX.get(record.levelno, "calibprompt: note: " if record.levelno == logging.WARNING
                                 else "calibprompt: error: ")
        return prefix + record.getMessage()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _raised_by_us(err: BaseException) -> bool:
    """True when the innermost frame that raised ``err`` is calibprompt's own code: a deliberate input
    check. A ValueError from inside numpy or torch is a failure, not a user's input error."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def _one_line(err: BaseException) -> tuple[str, int]:
    """The message and exit code for an error, or ("", 0) when it is not one we explain."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
        where = f" {err.filename}" if err.filename else ""
        return (f"cannot write{where}: {err.strerror}. Free space, fix the permissions or choose another "
                "--out / CALIBPROMPT_CACHE", 1)
    if isinstance(err, (NotADirectoryError, IsADirectoryError, FileExistsError)):
        return str(err), 2
    if isinstance(err, (FileNotFoundError, KeyError, ValueError)):
        return (str(err), 2) if _raised_by_us(err) else (
            f"{type(err).__name__} inside a library: {err} (rerun with --debug for the traceback)", 1)
    return "", 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from calibprompt.cli.output import log_level

    restore = _configure_logging(log_level(args))
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # noqa: BLE001 - every error becomes one line (or a traceback with --debug)
        message, code = _one_line(err)
        if args.debug or not message:
            traceback.print_exc()
            return code or 1
        print(f"calibprompt: error: {message}", file=sys.stderr)
        return code
    finally:
        restore()  # main() may be called again in this process (tests, notebooks) with other flags


if __name__ == "__main__":
    sys.exit(main())
