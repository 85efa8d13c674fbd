"""The ``grad-guard`` parser: fast help, refused option values, the demo's options."""

import argparse
import json
import subprocess
import sys
import types
import typing

import pytest

from grad_guard import cli

HEAVY = ("torch", "lightning", "pytorch_lightning", "numpy", "tensorboard", "matplotlib")

# runs main() in a fresh interpreter and prints the exit code and which heavy modules
# were imported by then
PROBE = """
import json, sys
from grad_guard.cli import main
code = main(sys.argv[1:])
print(json.dumps([code, sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


def _probe(*argv: str) -> tuple[int, list[str], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return code, heavy, done.stdout + done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["report", "--help"],
        ["--version"],
        ["report", ".", "--precision", "17-mixed"],
        ["demo", "--steps", "0"],
    ],
)
def test_parsing_imports_no_torch_lightning_or_numpy(argv):
    code, heavy, out = _probe(*argv)
    assert heavy == [], f"{argv} imported {heavy}"
    assert code == (0 if argv[-1] in ("--help", "--version") else 2), out


def test_help_texts_list_each_command_and_option():
    _, _, top = _probe("--help")
    assert "report" in top and "demo" in top
    _, _, demo = _probe("demo", "--help")
    for option in ("--quick", "--out", "--steps", "--seeds", "--depth", "--no-progress"):
        assert option in demo
    assert "sigmoid" in demo  # the demo's rows, from grad_guard.demo's own parser
    _, _, report = _probe("report", "--help")
    for option in ("logdir", "--out", "--overwrite", "--window", "--max-rows", "--precision"):
        assert option in report


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["report", ".", "--precision", "17-mixed"], "--precision"),
        (["report", ".", "--precision", "fp16"], "--precision"),
        (["report", ".", "--window", "0"], "--window"),
        (["report", ".", "--max-rows", "-3"], "--max-rows"),
        (["report", ".", "--window", "ten"], "--window"),
        (["report", ".", "--colour"], "--colour"),
        (["report"], "logdir"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--depth", "1"], "--depth"),
        (["demo", "--seed", "-1"], "--seed"),
        (["nonsense"], "nonsense"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_the_option(argv, named, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and named in err, err


def test_precision_message_lists_what_is_allowed(capsys):
    assert cli.main(["report", ".", "--precision", "17-mixed"]) == 2
    err = capsys.readouterr().err
    assert "'17-mixed'" in err and "16-mixed" in err and "bf16-mixed" in err


@pytest.mark.parametrize(
    ("given", "parsed"),
    [("16", "16-mixed"), ("bf16", "bf16-mixed"), ("32", "32-true"), ("16-mixed", "16-mixed")],
)
def test_precision_aliases_become_lightnings_names(given, parsed):
    args = cli.parser().parse_args(["report", "run", "--precision", given])
    assert args.precision == parsed


def test_precisions_are_the_ones_lightning_accepts():
    from lightning.fabric import connector

    assert set(cli.PRECISIONS) == set(typing.get_args(connector._PRECISION_INPUT_STR))
    assert cli.PRECISION_ALIASES == connector._PRECISION_INPUT_STR_ALIAS_CONVERSION


def _options(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {
        "/".join(action.option_strings): action.default
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }


def _positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [action.dest for action in parser._actions if not action.option_strings]


def test_report_options_match_the_report_commands_own_parser():
    from grad_guard.report import command

    ours, theirs = cli.subcommands(cli.parser())["report"], command.build_parser()
    assert _options(ours) == _options(theirs)
    assert _positionals(ours) == _positionals(theirs) == ["logdir"]


def test_report_arguments_reach_the_report_command(monkeypatch):
    from grad_guard.report import command

    seen = []
    monkeypatch.setattr(command, "run", lambda args: seen.append(vars(args)) or 7)
    argv = ["report", "logs", "--out", "o", "--overwrite", "--window", "3", "--precision", "16"]
    assert cli.main(argv) == 7
    assert seen == [
        {
            "version": False,
            "command": "report",
            "logdir": "logs",
            "out": "o",
            "overwrite": True,
            "window": 3,
            "max_rows": 40,
            "precision": "16-mixed",
        }
    ]


def test_demo_gets_its_command_line_untouched(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("grad_guard.demo")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "grad_guard.demo", fake)
    assert cli.main(["demo", "--steps", "5", "--quick"]) == 3
    assert cli.main(["demo", "--help"]) == 3  # the demo's own help, with its rows
    assert seen == [["--steps", "5", "--quick"], ["--help"]]

    monkeypatch.setitem(sys.modules, "grad_guard.demo", None)  # not installed
    assert cli.main(["demo"]) == 1
    assert "grad_guard.demo is not available" in capsys.readouterr().err


def test_no_command_prints_the_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
