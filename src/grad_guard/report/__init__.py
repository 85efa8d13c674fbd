"""The gradient health report: a per-layer table and a diagnosis with advice.

Build one with :func:`build_report` from a :class:`~grad_guard.history.GradientHistory`
(plus, optionally, the model, the Trainer's precision and the run's grad_guard
settings), or from a run folder's TensorBoard event files with
:func:`report_from_event_files`:

* a table with, per layer, min / median / max gradient norm, the last parameter norm,
  the median update ratio and the events that named the layer;
* totals: skipped steps, clipped fraction, AMP overflows, anomaly counts;
* :class:`Finding` objects: rules (``report/rules/``, one per file) that turn the
  evidence into advice, each citing the numbers it rests on. With the model at hand the
  advice names the change to make; with the run's settings (``grad_guard/config``) it
  never recommends what the run already uses.

The report prints with rich when it is installed (plain text otherwise) and is written
as ``grad_guard_report.json`` (machine-readable, :meth:`Report.to_dict`) and
``grad_guard_report.md``.

Report of one run folder (what the TensorBoard dashboard's ``report?run=R`` route
serves)::

    report = report_from_event_files("lightning_logs/version_0")
    report.to_dict()   # JSON-safe dict: NaN -> None, Inf -> "inf"
    report.notices     # what could not be read, e.g. a file damaged half-way

Modules: ``model_info`` (inspect the model), ``findings`` (rows, findings),
``rules/`` (diagnosis), ``build`` (history -> report), ``health_report`` (the
:class:`Report`), ``render_text`` / ``render_rich`` / ``render_markdown``, ``files``,
``trainer`` (end of fit), ``eventfile`` / ``run_reader`` / ``run_config`` /
``logged_events`` (reading event files), ``command`` (``grad-guard report``).

Names are imported lazily, so importing this package is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "Report": "grad_guard.report.health_report",
    "REPORT_FORMAT": "grad_guard.report.health_report",
    "build_report": "grad_guard.report.build",
    "report_from_event_files": "grad_guard.report.build",
    "report_from_run": "grad_guard.report.build",
    "layer_rows": "grad_guard.report.build",
    "report_for_trainer": "grad_guard.report.trainer",
    "log_dir": "grad_guard.report.trainer",
    "ModelInfo": "grad_guard.report.model_info",
    "inspect_model": "grad_guard.report.model_info",
    "Finding": "grad_guard.report.findings",
    "LayerRow": "grad_guard.report.findings",
    "Severity": "grad_guard.report.findings",
    "Thresholds": "grad_guard.report.rules.base",
    "HEALTHY_UPDATE_RATIO": "grad_guard.report.rules.base",
    "JSON_NAME": "grad_guard.report.render_text",
    "MARKDOWN_NAME": "grad_guard.report.render_text",
    "RunConfig": "grad_guard.report.run_config",
    "CONFIG_TAG": "grad_guard.report.run_config",
    "EVENTS_TAG": "grad_guard.report.logged_events",
    "RunData": "grad_guard.report.run_reader",
    "read_run": "grad_guard.report.run_reader",
    "find_runs": "grad_guard.report.run_reader",
}

__all__ = [
    "CONFIG_TAG",
    "EVENTS_TAG",
    "HEALTHY_UPDATE_RATIO",
    "JSON_NAME",
    "MARKDOWN_NAME",
    "REPORT_FORMAT",
    "Finding",
    "LayerRow",
    "ModelInfo",
    "Report",
    "RunConfig",
    "RunData",
    "Severity",
    "Thresholds",
    "build_report",
    "find_runs",
    "inspect_model",
    "layer_rows",
    "log_dir",
    "read_run",
    "report_for_trainer",
    "report_from_event_files",
    "report_from_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grad_guard.report' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.report.build import (
        build_report,
        layer_rows,
        report_from_event_files,
        report_from_run,
    )
    from grad_guard.report.findings import Finding, LayerRow, Severity
    from grad_guard.report.health_report import REPORT_FORMAT, Report
    from grad_guard.report.logged_events import EVENTS_TAG
    from grad_guard.report.model_info import ModelInfo, inspect_model
    from grad_guard.report.render_text import JSON_NAME, MARKDOWN_NAME
    from grad_guard.report.rules.base import HEALTHY_UPDATE_RATIO, Thresholds
    from grad_guard.report.run_config import CONFIG_TAG, RunConfig
    from grad_guard.report.run_reader import RunData, find_runs, read_run
    from grad_guard.report.trainer import log_dir, report_for_trainer
