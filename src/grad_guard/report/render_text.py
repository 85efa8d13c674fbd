"""The report as plain text, and the pieces every renderer shares (headline, cells...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grad_guard.report.findings import LayerRow
from grad_guard.report.logged_events import describe_event
from grad_guard.report.rules.base import fmt

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.report.health_report import Report

JSON_NAME = "grad_guard_report.json"
MARKDOWN_NAME = "grad_guard_report.md"
COLUMNS = ("layer", "min", "median", "max", "param norm", "update ratio", "events")
MAX_EVENTS_SHOWN = 10


def headline(report: Report) -> str:
    """``grad_guard report: 8 layers, 500 logged steps (steps 3-1999): 1 problem(s) found``."""
    span = f"steps {report.steps[0]}-{report.steps[1]}" if report.steps else "no steps"
    problems = sum(f.severity != "info" for f in report.findings)
    verdict = f"{problems} problem(s) found" if problems else "no gradient problems found"
    if report.notices:
        verdict += " in what could be read"
    return (
        f"grad_guard report: {len(report.layers)} layers, {report.logged_steps} logged steps "
        f"({span}): {verdict}"
    )


def notice_lines(report: Report) -> list[str]:
    """``NOTICE: ...`` lines about what could not be read."""
    return [f"NOTICE: {note}" for note in report.notices]


def settings_line(report: Report) -> str | None:
    """The run's own settings, when they were logged."""
    return f"run settings: {report.config.describe()}" if report.config is not None else None


def totals_text(report: Report) -> str:
    """Skipped steps, clipped fraction and anomaly counts on one line."""
    t = report.totals
    clipped = "n/a" if t.get("clipped_fraction") is None else f"{100 * t['clipped_fraction']:.1f}%"
    return (
        f"skipped steps {t.get('skipped_steps', 0)} | clipped {clipped} | "
        f"AMP overflows {t.get('amp_overflow', 0)} | non-finite {t.get('nonfinite', 0)} | "
        f"exploding {t.get('exploding', 0)} | vanishing {t.get('vanishing', 0)}"
        + (f" | loss spikes {t['loss_spike']}" if t.get("loss_spike") else "")
        + (f" | rollbacks {t['rollbacks']}" if t.get("rollbacks") else "")
    )


def event_lines(report: Report, most: int | None = MAX_EVENTS_SHOWN) -> list[str]:
    """One line per anomaly event (the first ``most``), then how many more there are."""
    events = report.events if most is None else report.events[:most]
    lines = [describe_event(event) for event in events]
    hidden = len(report.events) - len(events)
    if hidden:
        lines.append(f"... {hidden} more event(s) in {JSON_NAME}")
    return lines


def table_rows(report: Report, max_rows: int | None) -> tuple[list[LayerRow], int]:
    """The rows to show (at most ``max_rows``) and how many are hidden.

    Rare troubles (NaN, dead, events) come first, then layers spread evenly over the depth.
    """
    rows = report.layers
    if max_rows is None or len(rows) <= max_rows:
        return rows, 0
    flagged = [i for i, r in enumerate(rows) if r.events or set(r.flags) - {"vanishing"}]
    keep = set(flagged[: max_rows // 2])
    spread = max_rows - len(keep)
    keep |= {round(k * (len(rows) - 1) / max(spread - 1, 1)) for k in range(spread)}
    chosen = [rows[i] for i in sorted(keep)]
    return chosen, len(rows) - len(chosen)


def row_cells(row: LayerRow) -> tuple[str, ...]:
    """The table cells of one row, in :data:`COLUMNS` order."""
    return (
        row.name,
        fmt(row.min),
        fmt(row.median),
        fmt(row.max),
        fmt(row.last_param_norm),
        fmt(row.update_ratio),
        row.events_text(),
    )


def findings_lines(report: Report) -> list[str]:
    """The diagnosis: each finding with its evidence and advice."""
    if not report.findings:
        return ["Diagnosis: healthy, no rule fired."]
    lines = ["Diagnosis:"]
    for f in report.findings:
        lines.append(f"[{f.severity.upper()}] {f.title}")
        lines += [f"    evidence: {e}" for e in f.evidence]
        lines += [f"    try: {a}" for a in f.advice]
    return lines


def render_text(report: Report, max_rows: int | None = 40) -> str:
    """The whole report as plain text (what is printed without rich)."""
    lines = [headline(report), *notice_lines(report), ""]
    rows, hidden = table_rows(report, max_rows)
    cells = [COLUMNS] + [row_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for cell in cells:
        lines.append(
            "  ".join(
                c.ljust(w) if i in (0, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(cell, widths))
            ).rstrip()
        )
    if hidden:
        lines.append(f"... {hidden} more layers in {JSON_NAME}")
    lines += ["", totals_text(report)]
    if report.model:
        lines.append(f"model: {report.model.describe()}")
    if (settings := settings_line(report)) is not None:
        lines.append(settings)
    if report.events:
        lines += ["", f"Events ({len(report.events)}):", *("  " + e for e in event_lines(report))]
    lines.append("")
    lines += findings_lines(report)
    return "\n".join(lines)
