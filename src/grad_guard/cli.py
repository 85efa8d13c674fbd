"""The ``grad-guard`` command.

* ``grad-guard report LOGDIR [--out DIR]``: read the TensorBoard event files of a
  finished (or running) run, print the gradient health report, and write
  ``grad_guard_report.json``/``.md`` and the heatmap / gradient-flow PNGs. Nothing is
  trained; Lightning is not imported.
* ``grad-guard demo ...``: the vanishing/exploding gradients demo (``grad_guard.demo``).
* ``grad-guard --version``.

Example:
    >>> main(["--version"])  # doctest: +ELLIPSIS
    grad-guard ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import grad_guard


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grad-guard",
        description="Gradient health for PyTorch Lightning: reports and demos.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = commands.add_parser(
        "report",
        help="print the gradient report of a TensorBoard log directory",
        description=(
            "Read the grad_guard scalars (grad_norm/<layer>, param_norm/<layer>, "
            "update_ratio/<layer>, grad_guard/...) from the TensorBoard event files of a run, "
            "print the per-layer table and the diagnosis, and write grad_guard_report.json, "
            "grad_guard_report.md, gradient_heatmap.png and gradient_flow.png. "
            "Works on a running run; nothing is trained."
        ),
    )
    report.add_argument(
        "logdir", help="a run folder, or a parent of run folders (the newest run is read)"
    )
    report.add_argument(
        "--out", default=None, help="where to write the files (default: the run folder)"
    )
    report.add_argument(
        "--window", type=int, default=20, help="logged steps in the gradient-flow chart"
    )
    report.add_argument(
        "--max-rows", type=int, default=40, help="most table rows printed (all go to the JSON)"
    )
    report.add_argument(
        "--precision",
        default=None,
        help="the run's precision (e.g. 16-mixed), to make non-finite advice specific",
    )

    demo = commands.add_parser(
        "demo",
        help="reproduce vanishing / exploding gradients and their fixes",
        add_help=False,
    )
    demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments for grad_guard.demo")
    # main() hands everything after "demo" to grad_guard.demo untouched (argparse's
    # REMAINDER would reject a leading "--option"); this parser only lists the command.
    return parser


def _report(args: argparse.Namespace) -> int:
    from grad_guard.history import GradientHistory
    from grad_guard.report import build_report

    if not os.path.isdir(args.logdir):
        print(f"grad-guard report: {args.logdir!r} is not a directory", file=sys.stderr)
        return 2
    try:
        history = GradientHistory.from_event_files(args.logdir)
    except FileNotFoundError as err:
        print(f"grad-guard report: {err}", file=sys.stderr)
        return 2
    run_dir = history.meta.get("run_dir", args.logdir)
    if not history.layers:
        print(
            f"grad-guard report: the event files in {run_dir!r} hold no grad_guard gradient "
            "norms (tags grad_norm/<layer>); was GradientNormMonitor or GradGuard on the "
            "Trainer's callbacks?",
            file=sys.stderr,
        )
        return 1
    report = build_report(history, precision=args.precision)
    print(f"run: {run_dir}")
    report.print(max_rows=args.max_rows)
    out = args.out or run_dir
    try:
        paths = report.write(out)
    except OSError as err:
        print(
            f"grad-guard report: cannot write to {out!r} ({err}); pass --out DIR", file=sys.stderr
        )
        return 1
    written = [paths["json"], paths["markdown"]]
    from grad_guard import plots

    if plots.available():
        written += plots.save_pictures(history, out, window=args.window)
    else:
        print(
            'grad-guard report: matplotlib is not installed, no PNG written: pip install "grad-guard[plot]"',
            file=sys.stderr,
        )
    print("wrote " + ", ".join(written))
    return 0


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
    result = demo.main(argv)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the ``grad-guard`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = _parser().parse_args(argv)
    if args.version:
        print(f"grad-guard {grad_guard.__version__}")
        return 0
    if args.command == "report":
        return _report(args)
    _parser().print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
