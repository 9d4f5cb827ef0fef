"""``calibprompt config schema`` and ``calibprompt config validate`` (docs/ecosystem.md)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    config = subparsers.add_parser("config", help="the run config's JSON Schema, and checking config files",
                                   description="Write the run config's JSON Schema (for editors), or check "
                                               "config files without loading any data or model.")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    p = sub.add_parser("schema", help="print (or write) the JSON Schema of a run config")
    p.add_argument("--out", help="write the schema to this file instead of printing it")
    p.set_defaults(func=_schema)
    p = sub.add_parser("validate", help="check run config files; exit 2 naming each bad key")
    p.add_argument("files", nargs="+", help="run config files (YAML)")
    p.set_defaults(func=_validate)
    config.set_defaults(func=lambda args: (config.print_help(), 2)[1])


def _schema(args: argparse.Namespace) -> int:
    from calibprompt.config import json_schema
    from calibprompt.settings import atomic_write_text

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        from calibprompt.cli.output import emit_json

        atomic_write_text(args.out, text)
        if args.json:
            emit_json({"out": str(args.out)})
        else:
            print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from calibprompt.cli.output import emit
    from calibprompt.config import validate_file

    found = {path: validate_file(path) for path in args.files}
    lines = []
    for path, problems in found.items():
        if problems:
            lines += [f"{path}: {line}" for problem in problems for line in problem.splitlines() if line.strip()]
        else:
            lines.append(f"{path}: valid")
    bad = any(found.values())
    if bad and not args.json:
        print("\n".join(lines), file=sys.stderr)
    else:
        emit(args, {"valid": not bad, "problems": found}, "\n".join(lines))
    return 2 if bad else 0
