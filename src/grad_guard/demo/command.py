"""``grad-guard demo``: reproduce vanishing and exploding gradients, and their fixes.

:func:`main` parses the options (torch and Lightning are imported only once they are
valid, so ``--help`` is instant), trains every row of
:func:`~grad_guard.demo.experiments.default_experiments` for every seed with a
``GradGuard`` attached (:func:`~grad_guard.demo.matrix.run_demo`), prints the table and
the lessons, and writes ``results.md``, ``results.json`` and
``gradient_flow_comparison.png`` into ``--out``.

Example:
    >>> main(["--steps", "0"])
    2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import textwrap
import time
from collections.abc import Sequence

from grad_guard.cli import int_at_least
from grad_guard.demo.experiments import default_experiments
from grad_guard.demo.settings import (
    DEFAULT_OUT,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    QUICK_SEEDS,
    QUICK_STEPS,
    REQUIRED,
)

PROG = "grad-guard demo"
DESCRIPTION = """\
Reproduce vanishing and exploding gradients, and their fixes, on scikit-learn's digits
(1797 8x8 images, bundled offline), with GradGuard watching every run.

Backpropagation multiplies the gradient by one Jacobian per layer on its way from the
loss to the input. When those factors are below 1 (sigmoid's derivative is at most
0.25, and PyTorch's default init keeps weights small) the gradient shrinks
geometrically: the first layers of a deep network get almost nothing and do not learn.
That is a VANISHING gradient. When the factors are above 1, or a large learning rate
with momentum lets the weights grow, the gradient grows instead: updates overshoot and
the loss becomes NaN/Inf. That is an EXPLODING gradient.

The remedies are Xavier/He initialisation (factors near 1 at the start), ReLU-family
activations (derivative 1 where active), gradient clipping (bound each update), and
BatchNorm with residual connections (an identity path for the gradient). Every row
below is trained once per seed; the table gives each row's outcome for every seed, its
mean accuracy and the spread over seeds:"""

EPILOG = """\
Outputs (under --out): one TensorBoard run per row and seed (OUT/<row>/seed_<n>/, with
the grad_guard scalars, the run's health report and, for the first seed, heatmap/flow
images), results.md and results.json (the table and every seed's numbers), and
gradient_flow_comparison.png (the first seed of every row).

Runs without clipping use GradGuard(clipping=None) with on_nonfinite="warn", so the
guard only observes and a divergence is the model's own. Clipped rows use the row's
grad_guard clipper inside GradGuard with the default detection, which sees the raw
gradient, before clipping. Every run uses one torch thread and its own seed, so the
numbers do not depend on --jobs or the core count.

Needs the demo extra: pip install "grad-guard[demo]" (scikit-learn, matplotlib, rich)."""


def _row_list() -> str:
    lines = []
    for exp in default_experiments():
        lines.append(f"  {exp.name}  ({exp.expected})")
        lines.append(
            textwrap.fill(exp.lesson, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def add_options(target: argparse.ArgumentParser) -> None:
    """Declare the demo's options on ``target`` (this parser's, or ``grad-guard``'s sub-parser).

    Imports nothing heavy, so a command-line front end can declare them and answer
    ``--help`` at once.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_options(p)
        >>> p.parse_args(["--seeds", "2"]).seeds
        2
    """
    add = target.add_argument
    add(
        "--quick",
        action="store_true",
        help=f"{QUICK_STEPS} steps and {QUICK_SEEDS} seed per "
        f"row instead of {DEFAULT_STEPS} and {DEFAULT_SEEDS} (a smoke test: only the step-0 "
        "facts, such as the vanishing ratio, are those of the full demo)",
    )
    add(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default ./{DEFAULT_OUT})"
    )
    add(
        "--steps",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=f"optimizer steps per run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    add(
        "--seeds",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help=f"seeds per row (default {DEFAULT_SEEDS}, {QUICK_SEEDS} with --quick)",
    )
    add(
        "--seed",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="first seed; the rows train with seeds N, N+1, ... (default 0)",
    )
    add(
        "--depth",
        type=int_at_least(2),
        default=None,
        metavar="N",
        help="layers of the sigmoid, tanh and residual rows (default 20)",
    )
    add(
        "--jobs",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="runs trained side by side in worker processes (default: the cores, at most "
        "4); the numbers do not depend on it",
    )
    add("--no-progress", action="store_true", help="no progress bar and no per-run lines")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The ``grad-guard demo`` argument parser (its ``--help`` explains every row)."""
    result = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION + "\n\n" + _row_list(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(result)
    return result


def missing_dependencies() -> list[str]:
    """The pip names of the demo's required packages that are not installed.

    Example:
        >>> isinstance(missing_dependencies(), list)
        True
    """
    missing = []
    for module, package in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def canonical_command(args: argparse.Namespace) -> str:
    """The command line that gives these numbers (``--out`` and ``--jobs`` do not matter)."""
    parts = [PROG]
    if args.quick:
        parts.append("--quick")
    for option in ("steps", "seeds", "depth"):
        if getattr(args, option) is not None:
            parts += [f"--{option}", str(getattr(args, option))]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grad-guard demo`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Returns ``0`` on success, ``2`` for invalid arguments (argparse names the option on
    stderr) and ``1`` when scikit-learn or matplotlib is missing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors: an exit code, not an exception
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    missing = missing_dependencies()
    if missing:
        print(
            f"{PROG}: needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install the demo extra: "
            'pip install "grad-guard[demo]"',
            file=sys.stderr,
        )
        return 1
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from grad_guard.demo import progress
    from grad_guard.demo.matrix import default_jobs, run_demo
    from grad_guard.demo.results import DemoResults, environment, load_average, write_outputs
    from grad_guard.demo.tables import lessons_text, print_table, summary_line

    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    count = args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
    seeds = list(range(args.seed, args.seed + count))
    rows = default_experiments(steps=steps, **({"depth": args.depth} if args.depth else {}))
    jobs = args.jobs or default_jobs()
    out = os.path.abspath(args.out)
    console = progress.console()
    show = not args.no_progress
    progress.say(
        console,
        f"Training {len(rows)} rows x {count} seed(s) x {steps} steps ({len(rows) * count} "
        f"runs, {jobs} at a time) into {out}",
    )
    start = time.perf_counter()
    clipped = {exp.name: exp.clip_algorithm is not None for exp in rows}
    with progress.RunProgress(len(rows) * count, console, show, clipped, show) as bar:
        results = run_demo(out, steps, seeds, rows, jobs=jobs, on_run=bar)
    wall_time = time.perf_counter() - start
    options = {"steps": steps, "seeds": seeds, "depth": args.depth or rows[0].model_kwargs["depth"]}
    demo = DemoResults(
        results, canonical_command(args), options, wall_time, jobs, environment(), load_average()
    )
    paths = write_outputs(demo, out)

    say = progress.say
    say(console, "")
    print_table(results, console, sys.stdout)
    say(console, "")
    say(console, "What each row teaches")
    say(console, lessons_text(results))
    say(console, "")
    robust = sum(row.robust for row in results)
    say(console, f"Trained {summary_line(results, wall_time, jobs)}.")
    say(console, f"{robust} of {len(results)} rows showed their expected outcome for every seed.")
    say(console, f"Wrote {paths['markdown']}, {paths['json']} and {paths['figure']}")
    say(console, f"Open the runs in TensorBoard:  tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
