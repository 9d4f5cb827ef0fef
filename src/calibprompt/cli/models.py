"""``calibprompt models``: the named backbones (the Med-VLM zoo)."""

from __future__ import annotations

from calibprompt.cli.output import emit_json

import argparse

COLUMNS = (("name", "name"), ("family", "family"), ("library", "library"), ("ctx", "context_length"),
           ("D_tok", "token_dim"), ("embed", "embed_dim"), ("warm-up lr", "warmup_lr"),
           ("paper", "paper"), ("source", "source"))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models", help="list the named backbones",
        description="List the named backbones: family, library, defaults and where the weights come from.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list with every field")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calibprompt.backbones.registry import list_backbones

    rows = list_backbones()
    if args.json:
        emit_json(rows)
        return 0
    cells = [[_cell(row[key]) for _, key in COLUMNS] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _) in enumerate(COLUMNS)]
    print("  ".join(title.ljust(w) for (title, _), w in zip(COLUMNS, widths)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    print("\nLoad one with `backbone: {name: <name>, path: <downloaded weights>}`; see docs/backbones.md.")
    return 0


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
