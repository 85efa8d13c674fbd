"""``grad-guard report LOGDIR``: the health report of every run under a log directory.

For each run folder (a folder holding event files itself) it prints the report and
writes ``grad_guard_report.json``/``.md`` and the two PNGs next to the run (or under
``--out``, one sub-folder per run), then prints one summary line per run. It never
replaces files silently: existing report files are kept unless ``--overwrite`` is
given (the end-of-fit report written by ``GradGuard`` saw the model, and is better
than one rebuilt from event files), and every path written is printed.

The run's precision and its clipping/detection settings come from the
``grad_guard/config`` text tag when the run logged it (``--precision`` overrides the
precision). A damaged event file is read up to the damage and reported as such.

Exit status: 0 when every grad_guard run was reported; 1 when no run holds grad_guard
data, or a run's event files hold nothing usable (damaged from the start); 2 for bad
arguments or a log directory without event files. Lightning is not imported.

``cli.py`` calls :func:`add_arguments` on its ``report`` sub-parser and :func:`run` with
the parsed arguments; :func:`main` is the same command with its own parser.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from grad_guard.report.precision import PRECISIONS

PROG = "grad-guard report"
DESCRIPTION = (
    "Read the grad_guard scalars, settings and anomaly events from the TensorBoard event "
    "files of every run under LOGDIR, print each run's per-layer table and diagnosis and "
    "one summary line per run, and write grad_guard_report.json, grad_guard_report.md, "
    "gradient_heatmap.png and gradient_flow.png next to each run. Existing report files "
    "are kept unless --overwrite is given. Works on a running run; nothing is trained."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``report`` command's arguments to ``parser`` (returns it)."""
    parser.add_argument("logdir", help="a run folder, or a folder of runs (every run is read)")
    parser.add_argument(
        "--out",
        default=None,
        help="write here instead of next to each run (one sub-folder per run)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing report files (default: keep them and say so)",
    )
    parser.add_argument(
        "--window", type=int, default=20, help="logged steps in the gradient-flow chart (>= 1)"
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=40,
        help="most table rows printed (>= 1; all go to the JSON)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        metavar="PRECISION",
        help="the run's precision, if it did not log it (one of: " + ", ".join(PRECISIONS) + ")",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser for the command."""
    return add_arguments(argparse.ArgumentParser(prog=PROG, description=DESCRIPTION))


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and :func:`run`; returns the exit status."""
    parser = build_parser()
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv))


def _error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    for name, flag in (("window", "--window"), ("max_rows", "--max-rows")):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{flag} must be an integer >= 1, got {value!r}"
    if args.precision is not None and args.precision not in PRECISIONS:
        return f"--precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}"
    if not os.path.isdir(args.logdir):
        return f"{args.logdir!r} is not a directory"
    return None


def run(args: argparse.Namespace) -> int:
    """Report every run under ``args.logdir``; returns the exit status (see the module doc).

    Args:
        args: ``logdir``, ``out``, ``overwrite``, ``window``, ``max_rows``, ``precision``
            (as :func:`add_arguments` defines them).
    """
    args.overwrite = bool(getattr(args, "overwrite", False))
    problem = _check_args(args)
    if problem:
        return _error(problem)
    from grad_guard.report.run_reader import find_runs

    try:
        runs = find_runs(args.logdir)
    except FileNotFoundError as err:
        return _error(str(err))
    outcomes = []
    for index, run_dir in enumerate(runs, start=1):
        if len(runs) > 1:
            print(f"\n== run {index}/{len(runs)}: {run_dir}")
        else:
            print(f"run: {run_dir}")
        outcomes.append(_report_run(run_dir, args))
    print()
    print(f"summary ({len(runs)} run(s) under {args.logdir}):")
    for outcome in outcomes:
        print("  " + outcome["line"])
    reported = [o for o in outcomes if o["status"] in ("ok", "partial")]
    if not reported:
        print(
            f"{PROG}: no grad_guard gradient norms (tags grad_norm/<layer>) in any run under "
            f"{args.logdir!r}; was GradientNormMonitor or GradGuard on the Trainer's callbacks?",
            file=sys.stderr,
        )
        return 1
    return 1 if any(o["status"] == "unreadable" for o in outcomes) else 0


def _target(run_dir: str, args: argparse.Namespace) -> str:
    if args.out is None:
        return run_dir
    relative = os.path.relpath(run_dir, args.logdir)
    return args.out if relative == os.curdir else os.path.join(args.out, relative)


def _report_run(run_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    from grad_guard.report.build import report_from_run
    from grad_guard.report.files import existing_outputs, save_pictures
    from grad_guard.report.run_reader import read_run

    name = os.path.relpath(run_dir, args.logdir)
    name = os.path.basename(os.path.abspath(run_dir)) if name == os.curdir else name
    data = read_run(run_dir)
    if not data.usable:
        for note in data.notices():
            print(f"NOTICE: {note}")
        if not data.complete:
            print(f"{PROG}: {run_dir}: nothing usable could be read", file=sys.stderr)
            return {"status": "unreadable", "line": f"{name}: UNREADABLE, nothing usable read"}
        print("no grad_guard gradient norms (grad_norm/<layer>) in this run: skipped")
        return {"status": "empty", "line": f"{name}: no grad_guard data, skipped"}
    report = report_from_run(data, precision=args.precision)
    report.print(max_rows=args.max_rows)
    target = _target(run_dir, args)
    existing = existing_outputs(target)
    if existing and not args.overwrite:
        print(f"kept the existing report in {target} (pass --overwrite to replace it)")
        where = f"{target} (existing report kept)"
    else:
        try:
            paths = report.write(target)
        except OSError as err:
            print(f"{PROG}: cannot write to {target!r} ({err}); pass --out DIR", file=sys.stderr)
            return {"status": "unreadable", "line": f"{name}: report not written ({err})"}
        files = [paths["json"], paths["markdown"]]
        files += save_pictures(data.history, target, args.window)
        print(("replaced " if existing else "wrote ") + ", ".join(files))
        where = target
    problems = [f.rule for f in report.findings if f.severity != "info"]
    span = f"steps {report.steps[0]}-{report.steps[1]}" if report.steps else "no steps"
    verdict = f"{len(problems)} problem(s): {', '.join(problems)}" if problems else "healthy"
    partial = "; PARTIAL READ (see the notice)" if report.notices else ""
    line = (
        f"{name}: {len(report.layers)} layers, {report.logged_steps} logged steps ({span}); "
        f"{verdict}{partial} -> {where}"
    )
    return {"status": "partial" if report.notices else "ok", "line": line}
