"""The report printed with rich (a coloured table), when rich is installed."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from grad_guard.report.render_text import (
    COLUMNS,
    JSON_NAME,
    event_lines,
    headline,
    notice_lines,
    row_cells,
    settings_line,
    table_rows,
    totals_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.report.health_report import Report

_COLORS = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def isatty(file: TextIO) -> bool:
    """Whether ``file`` is a terminal (``False`` for anything that cannot say)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


def print_rich(report: Report, file: TextIO, max_rows: int | None) -> None:
    """Print ``report`` to ``file`` with rich.

    Raises:
        ImportError: if rich is not installed.
    """
    from rich.console import Console
    from rich.table import Table

    # rich would wrap the table at 80 columns when writing to a pipe or a file
    console = Console(file=file, width=None if isatty(file) else 140)

    def say(text: str, style: str | None = None) -> None:
        console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    say(headline(report), "bold")
    for line in notice_lines(report):
        say(line, "bold yellow")
    table = Table()
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("layer", "events") else "right")
    rows, hidden = table_rows(report, max_rows)
    for row in rows:
        style = "red" if row.nonfinite or "dead" in row.flags else None
        table.add_row(*row_cells(row), style=style)
    console.print(table, markup=False)
    if hidden:
        say(f"... {hidden} more layers in {JSON_NAME}")
    say(totals_text(report))
    if report.model:
        say(f"model: {report.model.describe()}")
    if (settings := settings_line(report)) is not None:
        say(settings)
    if report.events:
        say(f"Events ({len(report.events)}):")
        for line in event_lines(report):
            say("  " + line)
    if not report.findings:
        say("Diagnosis: healthy, no rule fired.", "green")
    for f in report.findings:
        say(f"[{f.severity.upper()}] {f.title}", _COLORS[f.severity])
        for e in f.evidence:
            say(f"    evidence: {e}")
        for a in f.advice:
            say(f"    try: {a}")
