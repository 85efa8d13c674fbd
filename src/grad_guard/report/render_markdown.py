"""The report as Markdown (``grad_guard_report.md``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grad_guard.report.render_text import (
    COLUMNS,
    JSON_NAME,
    event_lines,
    headline,
    row_cells,
    settings_line,
    table_rows,
    totals_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.report.health_report import Report


def render_markdown(report: Report, max_rows: int | None = 200) -> str:
    """Headline, notices, diagnosis, events, totals and the per-layer table."""
    out = [f"# {headline(report)}", ""]
    for note in report.notices:
        out += [f"> **Notice:** {note}", ""]
    if report.model:
        out += [f"Model: {report.model.describe()}", ""]
    if report.precision:
        out += [f"Precision: `{report.precision}`", ""]
    if (settings := settings_line(report)) is not None:
        out += [settings[0].upper() + settings[1:], ""]
    out += ["## Diagnosis", ""]
    if not report.findings:
        out += ["Healthy: no rule fired.", ""]
    for f in report.findings:
        out += [f"### {f.severity}: {f.title}", "", "Evidence:", ""]
        out += [f"- {e}" for e in f.evidence]
        out += ["", "Try:", ""]
        out += [f"- {a}" for a in f.advice]
        out.append("")
    if report.events:
        out += [f"## Events ({len(report.events)})", ""]
        out += [f"- {line}" for line in event_lines(report, most=50)]
        out.append("")
    out += ["## Totals", "", totals_text(report), "", "## Layers", ""]
    out += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    rows, hidden = table_rows(report, max_rows)
    out += ["| " + " | ".join(row_cells(r)).replace("`", "") + " |" for r in rows]
    if hidden:
        out += ["", f"{hidden} more layers in `{JSON_NAME}`."]
    return "\n".join(out) + "\n"
