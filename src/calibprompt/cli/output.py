"""What every sub-command shares: the logging flags (``-v``, ``-q``, ``--log-level``) and ``--json``.

* ``-q`` / ``--quiet``: no progress and no status lines, notes only; ``-qq``: errors only.
* ``-v`` / ``--verbose``: debug detail too. ``--log-level LEVEL`` sets it by name and wins.
* ``--json``: the command's result as one JSON document on stdout, nothing else there (progress and
  notes stay on stderr), for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

LEVELS = ("debug", "info", "warning", "error")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Add the shared flags to one sub-command's parser (where it does not define them itself)."""
    known = parser._option_string_actions  # noqa: SLF001 - argparse keeps no public list
    group = parser.add_argument_group("output")
    if "--quiet" not in known:
        group.add_argument("-q", "--quiet", action="count", default=0,
                           help="no progress or status lines (-qq: errors only)")
    if "--verbose" not in known:
        group.add_argument("-v", "--verbose", action="count", default=0, help="debug detail on stderr")
    if "--log-level" not in known:
        group.add_argument("--log-level", choices=LEVELS, type=str.lower,
                           help="stderr log level by name (overrides -q / -v)")
    if "--json" not in known:
        group.add_argument("--json", action="store_true", help="print the result as one JSON document")


def log_level(args: argparse.Namespace) -> int:
    """The stderr level the flags ask for (INFO when none is given)."""
    if getattr(args, "log_level", None):
        return getattr(logging, args.log_level.upper())
    if getattr(args, "verbose", 0):
        return logging.DEBUG
    quiet = int(getattr(args, "quiet", 0) or 0)
    return logging.INFO if quiet == 0 else logging.WARNING if quiet == 1 else logging.ERROR


def emit_json(result: Any) -> None:
    """``result`` as one strict JSON document on stdout (NaN and infinities as null)."""
    from calibprompt.settings import strict_json

    print(json.dumps(strict_json(result), indent=2, default=str))


def emit(args: argparse.Namespace, result: Any, text: str | Callable[[], str]) -> None:
    """Print ``result`` as JSON under ``--json``, else the human ``text``."""
    if getattr(args, "json", False):
        emit_json(result)
    else:
        body = text() if callable(text) else text
        if body:
            sys.stdout.write(body if body.endswith("\n") else body + "\n")
