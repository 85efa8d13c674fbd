"""The ``grad-guard`` command: an argparse layer that imports the work it starts lazily.

* ``grad-guard report LOGDIR [--out DIR] [--overwrite]``: the gradient health report of
  every run under ``LOGDIR``, read from its TensorBoard event files
  (:mod:`grad_guard.report.command` does the work). Nothing is trained; Lightning is not
  imported.
* ``grad-guard demo [--quick] ...``: the vanishing/exploding gradients demo
  (:mod:`grad_guard.demo`, which parses its own options).
* ``grad-guard --version``.

Parsing imports nothing but argparse and ``grad_guard`` itself (which is lazy), so
``--help`` of every command and a refused option answer at once: torch, Lightning and
numpy are imported only by the command that runs. ``demo`` hands its command line to
:func:`grad_guard.demo.main`, whose parser imports no torch either; the report's options
are declared here (typed, so a bad value is refused by argparse) as well as in
:func:`grad_guard.report.command.build_parser`, and a test keeps the two equal.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    grad-guard ...
    0
    >>> main(["report", ".", "--window", "0"])  # argparse names the option on stderr
    2
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

import grad_guard

PRECISIONS = (
    "64-true",
    "32-true",
    "16-true",
    "bf16-true",
    "16-mixed",
    "bf16-mixed",
    "transformer-engine",
    "transformer-engine-float16",
)
"""Lightning 2.x precision values (``Trainer(precision=...)``) that ``--precision`` takes."""

PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
"""Lightning's short precision names and what it turns them into."""


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` that takes an int >= ``minimum`` and says so otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _precision(text: str) -> str:
    value = PRECISION_ALIASES.get(text, text)
    if value not in PRECISIONS:
        allowed = ", ".join((*PRECISIONS, *PRECISION_ALIASES))
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}")
    return value


def _add_report_options(report: argparse.ArgumentParser) -> None:
    report.add_argument("logdir", help="a run folder, or a folder of runs (every run is read)")
    report.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write here instead of next to each run (one sub-folder per run)",
    )
    report.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing report files (default: keep them and say so)",
    )
    report.add_argument(
        "--window",
        type=int_at_least(1),
        default=20,
        metavar="N",
        help="logged steps in the gradient-flow chart (default 20)",
    )
    report.add_argument(
        "--max-rows",
        type=int_at_least(1),
        default=40,
        metavar="N",
        help="most table rows printed; all go to the JSON (default 40)",
    )
    report.add_argument(
        "--precision",
        type=_precision,
        default=None,
        metavar="PRECISION",
        help="the run's Trainer precision (16-mixed, bf16-mixed, 32-true...), to make "
        "non-finite advice specific; by default the precision the run logged",
    )


def parser() -> argparse.ArgumentParser:
    """The ``grad-guard`` argument parser, with the ``report`` and ``demo`` commands.

    Returns:
        An :class:`argparse.ArgumentParser`; its sub-parsers are in
        ``subcommands(parser)``.

    Example:
        >>> sorted(subcommands(parser()))
        ['demo', 'report']
    """
    result = argparse.ArgumentParser(
        prog="grad-guard",
        description="Gradient health for PyTorch Lightning: reports and demos.",
    )
    result.add_argument("--version", action="store_true", help="print the version and exit")
    commands = result.add_subparsers(dest="command", metavar="COMMAND")
    _add_report_options(
        commands.add_parser(
            "report",
            help="print the gradient report of TensorBoard log directories",
            description=(
                "Read the grad_guard scalars, settings and anomaly events from the "
                "TensorBoard event files of every run under LOGDIR, print each run's "
                "per-layer table and diagnosis and one summary line per run, and write "
                "grad_guard_report.json, grad_guard_report.md, gradient_heatmap.png and "
                "gradient_flow.png next to each run. Existing report files are kept unless "
                "--overwrite is given. Works on a running run; nothing is trained."
            ),
        )
    )
    demo = commands.add_parser(
        "demo",
        help="reproduce vanishing / exploding gradients and their fixes",
        add_help=False,
    )
    # main() hands everything after "demo" to grad_guard.demo.main untouched: the demo's
    # own parser (argparse only, no torch) answers --help and refuses bad values
    demo.add_argument("args", nargs=argparse.REMAINDER, help="the demo's options")
    return result


def subcommands(root: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``root`` by command name (``{"report": ..., "demo": ...}``)."""
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _report(args: argparse.Namespace) -> int:
    from grad_guard.report.command import run

    return run(args)


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("grad_guard.demo")
    except ModuleNotFoundError as err:
        if err.name != "grad_guard.demo":
            raise
        print(
            "grad-guard demo: grad_guard.demo is not available in this installation",
            file=sys.stderr,
        )
        return 1
    return int(demo.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grad-guard`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Args:
        argv: the command line without the program name.

    Returns:
        ``0`` on success (and for ``--help``), ``2`` for a refused option or argument
        (argparse's message, naming it, goes to stderr), otherwise the command's code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return _demo(argv[1:])
    root = parser()
    try:
        args = root.parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors: an exit code, not an exception
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    if args.version:
        print(f"grad-guard {grad_guard.__version__}")
        return 0
    if args.command == "report":
        return _report(args)
    root.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
