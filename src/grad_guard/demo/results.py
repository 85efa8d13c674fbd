"""``results.json``, ``results.md`` and the comparison PNG: writing and reading them back.

``results.json`` holds every number the tables show, so the docs can be regenerated
from it (:mod:`grad_guard.demo.docs`). Two demos with the same options on one machine
write the same file but for the measured times, which live under the keys of
:data:`~grad_guard.demo.settings.WALL_CLOCK_KEYS` (:func:`without_wall_clock` drops them).
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grad_guard.demo.rows import DemoRow, json_safe
from grad_guard.demo.settings import (
    FIGURE_NAME,
    RESULTS_FORMAT,
    RESULTS_JSON,
    RESULTS_MD,
    WALL_CLOCK_KEYS,
)
from grad_guard.demo.tables import COLUMNS, results_markdown


@dataclass
class DemoResults:
    """A demo's rows and how they were made.

    Attributes:
        rows: the table's rows.
        command: the ``grad-guard demo`` command line, without ``--out`` and ``--jobs``
            (they do not change the numbers).
        options: ``steps``, ``seeds``, ``depth`` as run.
        wall_time_s: seconds the whole demo took (measured).
        jobs: worker processes that trained the runs.
        environment: torch / Python versions and the machine.
        load_average: the machine's 1-minute load average when the demo ended (``None``
            where the platform has none): a wall time means little without it.
    """

    rows: list[DemoRow]
    command: str
    options: dict[str, Any]
    wall_time_s: float
    jobs: int
    environment: dict[str, str]
    load_average: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "format": RESULTS_FORMAT,
                "command": self.command,
                "options": self.options,
                "environment": self.environment,
                "timing": {
                    "wall_time_s": self.wall_time_s,
                    "jobs": self.jobs,
                    "load_average": self.load_average,
                },
                "columns": list(COLUMNS),
                "robust_rows": sum(row.robust for row in self.rows),
                "rows": [row.to_dict() for row in self.rows],
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoResults:
        """Read :meth:`to_dict`'s output back.

        Raises:
            ValueError: if ``data`` is not a results file of this format.
        """
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"`data` must be a grad-guard demo results object of format "
                f"{RESULTS_FORMAT!r}, got format {found!r}"
            )
        timing = data.get("timing", {})
        return cls(
            rows=[DemoRow.from_dict(row) for row in data["rows"]],
            command=data["command"],
            options=dict(data["options"]),
            wall_time_s=float(timing.get("wall_time_s", 0.0)),
            jobs=int(timing.get("jobs", 1)),
            environment=dict(data.get("environment", {})),
            load_average=timing.get("load_average"),
        )


def environment() -> dict[str, str]:
    """The versions and machine the numbers were measured with.

    Example:
        >>> sorted(environment())
        ['machine', 'python', 'torch']
    """
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
    }


def load_average() -> float | None:
    """The 1-minute load average, ``None`` where the platform does not report one."""
    try:
        return round(os.getloadavg()[0], 1)
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return None


def without_wall_clock(value: Any) -> Any:
    """``value`` (a results object) without the measured-time keys, for comparisons.

    Example:
        >>> without_wall_clock({"a": 1, "timing": {"wall_time_s": 3.0}, "r": [{"wall_time_s": 1}]})
        {'a': 1, 'r': [{}]}
    """
    if isinstance(value, dict):
        return {k: without_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [without_wall_clock(v) for v in value]
    return value


def load_results(path: str) -> DemoResults:
    """Read a ``results.json`` (a file, or a folder that holds one).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if it is not a demo results file of this format.
    """
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_JSON)
    with open(path, encoding="utf-8") as f:
        return DemoResults.from_dict(json.load(f))


def write_outputs(results: DemoResults, out: str, figure: bool = True) -> dict[str, str]:
    """Write ``results.md``, ``results.json`` and (``figure=True``) the PNG into ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = {
        "markdown": os.path.join(out, RESULTS_MD),
        "json": os.path.join(out, RESULTS_JSON),
    }
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(results_markdown(results.rows, results.command, results.wall_time_s, results.jobs))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results.to_dict(), f, indent=1)
        f.write("\n")
    if figure:
        paths["figure"] = os.path.join(out, FIGURE_NAME)
        save_figure(results.rows, paths["figure"])
    return paths


def save_figure(rows: Sequence[DemoRow], path: str) -> None:
    """Draw :func:`~grad_guard.demo.figures.comparison_figure` into the PNG ``path``."""
    from grad_guard import plots
    from grad_guard.demo.figures import comparison_figure

    plots.save_png(comparison_figure(rows), path)
