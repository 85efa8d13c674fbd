"""The :class:`Report` object: the data of one run's health report and its outputs."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from grad_guard.jsonsafe import json_safe
from grad_guard.report.findings import Finding, LayerRow
from grad_guard.report.model_info import ModelInfo
from grad_guard.report.run_config import RunConfig

REPORT_FORMAT = "grad_guard_report/2"
"""``format`` key of :meth:`Report.to_dict` (2: adds notices, config, source, events)."""


@dataclass
class Report:
    """The gradient health report of one run. Build it with
    :func:`~grad_guard.report.build_report` (from a history) or
    :func:`~grad_guard.report.report_from_event_files` (from a run folder).

    Attributes:
        layers: one table row per layer, forward order.
        totals: counters (``nonfinite``, ``exploding``, ``vanishing``, ``amp_overflow``,
            ``skipped_steps``) and ``clipped_fraction``.
        findings: the diagnosis.
        model: what was found in the model, if it was at hand.
        precision: the run's precision, if known.
        steps: the first and last logged step (exact), ``None`` without records.
        logged_steps: how many logged steps were recorded.
        events: anomaly events (plain dicts), step order.
        config: the run's own grad_guard settings, if logged.
        source: where the data came from (run folder, event files, bytes read).
        notices: what could not be read (a damaged event file...), one sentence each.
    """

    layers: list[LayerRow]
    totals: dict[str, Any]
    findings: list[Finding]
    model: ModelInfo | None
    precision: str | None
    steps: tuple[int, int] | None
    logged_steps: int
    events: list[dict[str, Any]] = field(default_factory=list)
    config: RunConfig | None = None
    source: dict[str, Any] | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No finding above ``"info"``."""
        return not any(f.severity != "info" for f in self.findings)

    @property
    def complete(self) -> bool:
        """Whether all the run's data could be read (no notice)."""
        return not self.notices

    def rules(self) -> list[str]:
        """The rules that fired, in order."""
        return [f.rule for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe data (:func:`grad_guard.jsonsafe.json_safe`: NaN -> ``None``,
        Inf -> ``"inf"``), what ``grad_guard_report.json`` holds and the dashboard serves.
        """
        return json_safe(
            {
                "format": REPORT_FORMAT,
                "healthy": self.healthy,
                "complete": self.complete,
                "notices": list(self.notices),
                "logged_steps": self.logged_steps,
                "step_range": list(self.steps) if self.steps else None,
                "precision": self.precision,
                "config": self.config.raw if self.config is not None else None,
                "model": asdict(self.model) if self.model else None,
                "totals": self.totals,
                "findings": [asdict(f) for f in self.findings],
                "layers": [asdict(r) for r in self.layers],
                "events": self.events,
                "source": self.source,
            }
        )

    def render_text(self, max_rows: int | None = 40) -> str:
        """The report as plain text (what is printed without rich)."""
        from grad_guard.report.render_text import render_text

        return render_text(self, max_rows)

    def to_markdown(self, max_rows: int | None = 200) -> str:
        """The report as Markdown (``grad_guard_report.md``)."""
        from grad_guard.report.render_markdown import render_markdown

        return render_markdown(self, max_rows)

    def print(
        self, file: TextIO | None = None, use_rich: bool | None = None, max_rows: int | None = 40
    ) -> None:
        """Print the report, as a rich table when rich is installed (or ``use_rich``).

        Raises:
            ImportError: if ``use_rich=True`` and rich is not installed.
        """
        file = file or sys.stdout
        if use_rich is not False:
            try:
                from grad_guard.report.render_rich import print_rich

                print_rich(self, file, max_rows)
                return
            except ImportError:
                if use_rich:
                    raise
        print(self.render_text(max_rows), file=file)

    def write(self, directory: str | os.PathLike[str], overwrite: bool = True) -> dict[str, str]:
        """Write ``grad_guard_report.json`` and ``grad_guard_report.md`` into ``directory``.

        Args:
            directory: created if missing.
            overwrite: if ``False``, raise instead of replacing existing files.

        Returns:
            ``{"json": path, "markdown": path}``.

        Raises:
            FileExistsError: if ``overwrite=False`` and a report is already there.
        """
        from grad_guard.report.files import write_report

        return write_report(self, directory, overwrite=overwrite)
