"""The CLI's shared output contract: -q / -v / --log-level / --json on every sub-command, JSON-only
stdout under --json, and library code that never prints (it logs through the ``calibprompt`` logger)."""

from __future__ import annotations

import argparse
import ast
import json
import logging
from pathlib import Path

import pytest

import calibprompt
from calibprompt.cli import build_parser, main
from calibprompt.cli.output import log_level

PACKAGE = Path(calibprompt.__file__).parent


def _commands(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                nested = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
                if nested:
                    yield from _commands(command, f"{prefix}{name} ")
                else:
                    yield f"{prefix}{name}", command


def test_library_code_never_prints():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":
            continue  # the command line is where results are printed
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == [], f"library code prints (log through calibprompt.progress.log instead): {offenders}"


def test_every_command_takes_the_shared_flags():
    commands = dict(_commands(build_parser()))
    assert {"train", "eval", "sweep", "report", "tune", "predict", "export", "demo", "pretrain-micro",
            "data inspect", "data prepare", "config schema", "config validate"} <= set(commands)
    for name, command in commands.items():
        flags = set(command._option_string_actions)
        assert {"-q", "--quiet", "-v", "--verbose", "--log-level", "--json"} <= flags, name


@pytest.mark.parametrize("argv, level", [([], logging.INFO), (["-q"], logging.WARNING), (["-qq"], logging.ERROR),
                                         (["-v"], logging.DEBUG), (["-q", "--log-level", "debug"], logging.DEBUG)])
def test_log_level_flags(argv, level):
    args = build_parser().parse_args(["methods", *argv])
    assert log_level(args) == level


@pytest.mark.parametrize("argv", [["methods"], ["models"], ["datasets"], ["config", "schema"]])
def test_json_output_is_one_document(argv, capsys):
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert isinstance(json.loads(out), (list, dict))


def test_exit_codes_tell_input_errors_from_library_failures():
    import numpy as np

    from calibprompt.cli import _one_line
    from calibprompt.config import ConfigError, check_types

    try:
        check_types({"shots": -3})
    except ConfigError as err:
        ours = err
    try:
        np.zeros(3).reshape(2)
    except ValueError as err:
        numpy_error = err
    assert _one_line(ours) == (str(ours), 2)  # a user's input: usage error
    message, code = _one_line(numpy_error)
    assert code == 1 and message.startswith("ValueError inside a library") and "--debug" in message


def test_the_package_imports_no_posix_only_module():
    """Windows users can import everything: folder locks go through filelock, not fcntl."""
    posix_only = {"fcntl", "termios", "pwd", "grp", "resource"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] in posix_only]
    assert found == []


def test_flags_before_a_group_action_are_an_error_not_ignored(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["config", "--json", "validate", "x.yaml"])
    assert stop.value.code == 2 and "--json" in capsys.readouterr().err


def test_main_leaves_logging_as_it_found_it():
    import warnings

    logger = logging.getLogger("calibprompt")
    before = (list(logger.handlers), logger.level, logger.propagate, warnings.showwarning)
    for argv in (["methods", "-v", "--json"], ["methods", "-qq"], ["config", "validate", "/nonexistent.yaml"]):
        main(argv)
        assert (list(logger.handlers), logger.level, logger.propagate, warnings.showwarning) == before, argv


def test_a_note_inside_a_run_folder_log_is_shown_once(tmp_path, capsys, caplog):
    """The folder's log.txt must not make a note appear twice on stderr (once by the CLI's handler, once
    by logging's last resort), nor hide it from a caller that set up no logging."""
    from calibprompt.cli import _configure_logging
    from calibprompt.progress import folder_log, log

    restore = _configure_logging(logging.INFO)
    try:
        with folder_log(tmp_path):
            log.warning("check the learning rate")
            log.debug("detail for the file only")
    finally:
        restore()
    err = capsys.readouterr().err
    assert err.count("check the learning rate") == 1 and "calibprompt: note: check the learning rate" in err
    assert "detail" not in err and "detail for the file only" in (tmp_path / "log.txt").read_text()
