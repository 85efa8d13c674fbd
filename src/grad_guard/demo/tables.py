"""The demo's results as text: the table (markdown, plain, rich) and what each row teaches.

Every number in them comes from :class:`~grad_guard.demo.rows.DemoRow`, so the console
table, ``results.md``, ``docs/demo_results.md`` and the README's table agree.

Example:
    >>> from grad_guard.demo.rows import DemoRow, SeedRun
    >>> runs = [SeedRun("r", s, 5, 5, 1.0, a, 0.1, None, {}, None, [], "", 1.0)
    ...         for s, a in ((0, 0.96), (1, 0.98))]
    >>> print(markdown_table([DemoRow("r", "", "", "learns", None, runs)]).splitlines()[2])
    | r | learns | learns 2/2 | 97.0% | 2.0 | 1e+00 | - | - | - | healthy |
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

from grad_guard.demo.rows import DemoRow

COLUMNS = (
    "row",
    "expected",
    "outcome",
    "accuracy",
    "spread",
    "ratio@0",
    "NaN at step",
    "clipped",
    "flagged",
    "diagnosis",
)
"""Headers of the results table. ``outcome``: how many seeds showed each outcome;
``accuracy``: mean over seeds; ``spread``: max - min over seeds, in points;
``ratio@0``: first/last layer gradient ratio at step 0 (geometric mean over seeds);
``NaN at step``: first step with a NaN/Inf loss, per seed; ``flagged``: problems
GradGuard's detection or report raised; ``diagnosis``: report rules that fired."""

LEGEND = (
    "`outcome`: what each seed's run showed (`vanishes`: the first layers get no gradient "
    "and nothing is learned; `learns`: accuracy >= 90%; `diverges`: the loss became NaN/Inf, "
    "or the gradient norm grew 100-fold and the network died; "
    "`rescued`: a clipped run that learns). `accuracy`: mean over seeds on the whole digits "
    "set; `spread`: max - min over seeds, in points. `ratio@0`: first/last weight-layer "
    "gradient-norm ratio at step 0 (<< 1 is vanishing). `NaN at step`: first step with a "
    "NaN/Inf loss, per seed. `clipped`: fraction of steps the clipper clipped (mean). "
    "`flagged`: problems GradGuard raised on the raw gradient, before clipping, with the "
    "number of seeds; `diagnosis`: rules of GradGuard's end-of-fit report that fired."
)


def _count(name: str, count: int, total: int) -> str:
    return name if count == total else f"{name} ({count}/{total})"


def cells(row: DemoRow) -> list[str]:
    """The row's table cells, in the order of :data:`COLUMNS`."""
    total = len(row.runs)
    outcome = ", ".join(f"{name} {n}/{total}" for name, n in row.outcomes.most_common())
    nan = [str(step) for step in row.diverged_at if step is not None]
    clipped = row.clipped_fraction
    flagged = [
        _count(problem, sum(problem in run.problems for run in row.runs), total)
        for problem in row.problems
    ]
    rules = [_count(rule, n, total) for rule, n in sorted(row.rules.items())]
    return [
        row.name,
        row.expected,
        outcome,
        f"{row.accuracy_mean:.1%}",
        f"{row.accuracy_spread:.1f}",
        f"{row.grad_ratio:.0e}",
        ", ".join(nan) if nan else "-",
        "-" if clipped is None else f"{clipped:.0%}",
        ", ".join(flagged) or "-",
        ", ".join(rules) or "healthy",
    ]


def markdown_table(rows: Sequence[DemoRow]) -> str:
    """The results table as GitHub markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plain_table(rows: Sequence[DemoRow]) -> str:
    """The results table as aligned plain text (used without rich)."""
    table = [list(COLUMNS), *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def measured(row: DemoRow) -> str:
    """One sentence on what the row's runs showed, with their numbers."""
    total = len(row.runs)
    accuracies = ", ".join(f"{run.accuracy:.1%}" for run in row.runs)
    parts = [
        f"{row.outcomes[row.expected]}/{total} seeds {row.expected}",
        f"accuracy {row.accuracy_mean:.1%} (seeds: {accuracies})",
        f"first/last gradient ratio {row.grad_ratio:.0e} at step 0",
    ]
    nan = [step for step in row.diverged_at if step is not None]
    if nan:
        parts.append("the loss became NaN/Inf at step " + ", ".join(map(str, nan)))
    if row.clipped_fraction is not None:
        parts.append(f"{row.clip_algorithm} clipped {row.clipped_fraction:.0%} of the steps")
    if row.problems:
        parts.append("GradGuard flagged " + ", ".join(row.problems))
    return "; ".join(parts) + "."


def lessons_text(rows: Sequence[DemoRow], width: int = 100) -> str:
    """What each row teaches: the configuration, the lesson, then what the runs measured."""
    out = []
    for row in rows:
        out.append(f"{row.name}: {row.description}")
        for text in (row.lesson, "Here: " + measured(row)):
            out.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(out)


def lessons_markdown(rows: Sequence[DemoRow]) -> str:
    """The lessons as a markdown list (``results.md`` and ``docs/demo_results.md``)."""
    return "\n".join(
        f"- **{row.name}** (`{row.description}`): {row.lesson} *Here:* {measured(row)}"
        for row in rows
    )


def summary_line(rows: Sequence[DemoRow], wall_time_s: float, jobs: int) -> str:
    """How much was trained and how long it took (measured)."""
    seeds = sorted({len(row.runs) for row in rows})
    steps = sorted({run.steps for row in rows for run in row.runs})
    cpu = sum(row.cpu_time_s for row in rows)
    return (
        f"{len(rows)} rows x {'/'.join(map(str, seeds))} seeds x "
        f"{'/'.join(map(str, steps))} steps in {wall_time_s:.0f} s "
        f"({cpu:.0f} CPU-seconds of training; {jobs} worker process"
        f"{'es' if jobs != 1 else ''}, one torch thread each)"
    )


def results_markdown(rows: Sequence[DemoRow], command: str, wall_time_s: float, jobs: int) -> str:
    """``results.md``: how it was made, the table, the legend and the lessons."""
    robust = sum(row.robust for row in rows)
    return (
        "# grad-guard demo results\n\n"
        f"`{command}`: {summary_line(rows, wall_time_s, jobs)}. "
        f"{robust} of {len(rows)} rows showed their expected outcome for every seed.\n\n"
        + markdown_table(rows)
        + "\n"
        + LEGEND
        + "\n\n## What each row teaches\n\n"
        + lessons_markdown(rows)
        + "\n"
    )


def print_table(rows: Sequence[DemoRow], console: Any, file: TextIO) -> None:
    """Print the table with rich (``console``) or as plain text (``console=None``)."""
    if console is None:
        print(plain_table(rows), file=file)
        return
    from rich import box
    from rich.table import Table

    # below 120 columns the diagnosis moves out of the table (the lessons say it too)
    headers = COLUMNS if console.width >= 120 else COLUMNS[:-1]
    table = Table(
        title="grad-guard demo results",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1, 0, 0),
        pad_edge=False,
        show_edge=False,
    )
    for i, name in enumerate(headers):
        text = i < 3 or name in ("NaN at step", "flagged", "diagnosis")
        table.add_column(name, justify="left" if text else "right", no_wrap=i < 3)
    for row in rows:
        style = None if row.robust else "red"
        table.add_row(*cells(row)[: len(headers)], style=style)
    console.print(table)
