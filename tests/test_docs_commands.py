"""Every command the README, the docs and the error messages tell a user to run exists: each
``calibprompt <command>`` is a registered sub-command, and each other console tool named (``hf``) is
installed with the project."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from calibprompt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "src").rglob("*.py"))]


def _subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def _shell_lines(markdown: str) -> list[str]:
    """Lines inside fenced code blocks opened as ```bash, ```sh or a bare ```."""
    out, inside, shell = [], False, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            if inside:
                inside = False
            else:
                inside, shell = True, line.strip() in ("```", "```bash", "```sh")
        elif inside and shell:
            out.append(line)
    return out


def test_every_calibprompt_command_named_exists():
    known = _subcommands()
    named = set()
    for path in TEXTS:
        text = path.read_text()
        for match in re.finditer(r"`calibprompt (--?[a-z-]+ )?([a-z][a-z-]+)", text):
            named.add((match.group(2), path.name))
        for line in _shell_lines(text) if path.suffix == ".md" else []:
            match = re.match(r"\s*calibprompt (--?[a-z-]+ )?([a-z][a-z-]+)", line)
            if match:
                named.add((match.group(2), path.name))
    missing = sorted(f"{name} ({where})" for name, where in named if name not in known)
    assert not missing, "commands named but not registered: " + ", ".join(missing)


def test_console_tools_named_in_docs_and_messages_are_installed():
    bin_dir = Path(sys.executable).parent
    tools = set()
    for path in TEXTS:
        tools |= set(re.findall(r"`(hf|huggingface-cli) download", path.read_text()))
    assert tools == {"hf"}, tools  # huggingface_hub 1.x+ ships `hf`, not `huggingface-cli`
    assert (bin_dir / "hf").exists() or shutil.which("hf")
