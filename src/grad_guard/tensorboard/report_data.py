"""The health report of one run, as JSON, for the dashboard's report view.

The report is built by :func:`grad_guard.report.report_from_event_files` from the run's
event files on a local disk: the same report, findings and advice as the end-of-fit
report and ``grad-guard report LOGDIR``.
"""

from __future__ import annotations

from typing import Any


def build_report_json(run_dir: str) -> dict[str, Any]:
    """The report of the run whose event files are in ``run_dir``, as JSON-safe data.

    Args:
        run_dir: the run's folder (``events.out.tfevents.*`` directly in it).

    Raises:
        FileNotFoundError: if ``run_dir`` holds no event files.

    Example::

        build_report_json("lightning_logs/version_0")["findings"]
    """
    from grad_guard.report import report_from_event_files

    return dict(report_from_event_files(run_dir).to_dict())
