"""The health report of one run, as JSON, for the dashboard's report view.

The report is built by :mod:`grad_guard.report` from the run's event files on a local
disk (the same report ``grad-guard report LOGDIR`` prints), so the dashboard shows the
same findings and advice as the end-of-fit report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def build_report_json(
    run_dir: str,
    precision: str | None = None,
    events: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The report of the run whose event files are in ``run_dir``, as plain data.

    Args:
        run_dir: the run's folder (``events.out.tfevents.*`` directly in it).
        precision: the Trainer's precision, for precision-specific advice.
        events: anomaly events already read (``step``, ``kind``, ...), added to the
            report's event list.

    Raises:
        FileNotFoundError: if ``run_dir`` holds no event files.

    Example::

        build_report_json("lightning_logs/version_0")["findings"]
    """
    from grad_guard import report

    public = getattr(report, "report_from_event_files", None)
    if callable(public):
        return dict(public(run_dir).to_dict())
    from grad_guard.history import GradientHistory

    history = GradientHistory.from_event_files(run_dir)
    built = report.build_report(
        history, precision=precision, events=list(events) if events is not None else None
    )
    return dict(built.to_dict())
