"""Report files: ``grad_guard_report.json`` / ``.md`` (and the PNG pictures) on disk."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from grad_guard.report.render_text import JSON_NAME, MARKDOWN_NAME

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.history import GradientHistory
    from grad_guard.report.health_report import Report

PICTURE_NAMES = ("gradient_heatmap.png", "gradient_flow.png")


def report_paths(directory: str | os.PathLike[str]) -> dict[str, str]:
    """Where :func:`write_report` writes in ``directory``."""
    directory = os.fspath(directory)
    return {
        "json": os.path.join(directory, JSON_NAME),
        "markdown": os.path.join(directory, MARKDOWN_NAME),
    }


def existing_outputs(directory: str | os.PathLike[str]) -> list[str]:
    """Report and picture files already in ``directory``."""
    directory = os.fspath(directory)
    candidates = list(report_paths(directory).values())
    candidates += [os.path.join(directory, name) for name in PICTURE_NAMES]
    return [path for path in candidates if os.path.exists(path)]


def write_report(
    report: Report, directory: str | os.PathLike[str], overwrite: bool = True
) -> dict[str, str]:
    """Write the report's JSON (strict: no NaN literals) and Markdown into ``directory``.

    Raises:
        FileExistsError: if ``overwrite=False`` and one of the files exists.
        OSError: if ``directory`` cannot be created or written.
    """
    paths = report_paths(directory)
    if not overwrite:
        taken = [p for p in paths.values() if os.path.exists(p)]
        if taken:
            raise FileExistsError(f"a report is already there: {', '.join(taken)}")
    os.makedirs(os.fspath(directory), exist_ok=True)
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=2, allow_nan=False)
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(report.to_markdown())
    return paths


def save_pictures(history: GradientHistory, directory: str, window: int = 20) -> list[str]:
    """The heatmap and flow PNGs, when matplotlib is installed (``[]`` otherwise)."""
    from grad_guard import plots

    if not len(history) or not plots.available():
        return []
    return plots.save_pictures(history, directory, window=window)
