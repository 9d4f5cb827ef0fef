"""The ``calibprompt`` command. Each command group lives in its own module with a
``register(subparsers)`` function that adds its sub-commands and sets ``func`` on them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES = ["run", "models", "data", "experiments", "demo"]


def build_parser() -> argparse.ArgumentParser:
    from calibprompt import __version__

    parser = argparse.ArgumentParser(
        prog="calibprompt",
        description="Calibration-aware prompt learning for medical vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"calibprompt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"calibprompt.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Input errors are reported as one clear line, not a traceback.
        print(f"calibprompt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
