"""The end-of-fit report of a Lightning ``Trainer``: printed, and written next to its logs."""

from __future__ import annotations

from typing import Any

from grad_guard.history import GradientHistory
from grad_guard.report.build import build_report
from grad_guard.report.files import save_pictures
from grad_guard.report.health_report import Report


def log_dir(trainer: Any) -> str | None:
    """Where the report of ``trainer`` goes: its first logger's ``log_dir``, else the root dir."""
    for logger in getattr(trainer, "loggers", []) or []:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return str(directory)
    root = getattr(trainer, "default_root_dir", None)
    return str(root) if root else None


def report_for_trainer(
    trainer: Any,
    pl_module: Any,
    history: GradientHistory,
    print_report: bool = True,
    directory: str | None = None,
    **kwargs: Any,
) -> Report | None:
    """Build, print and write the report at the end of ``trainer.fit`` (global rank zero only).

    Writes ``grad_guard_report.json``/``.md`` (and the PNG pictures when matplotlib is
    installed) into ``directory`` or the logger's log directory.

    Args:
        trainer: the Lightning ``Trainer``.
        pl_module: the model, inspected to make the advice specific.
        history: the monitor's history.
        print_report: print it to stdout.
        directory: where to write (default: :func:`log_dir`).
        **kwargs: passed to :func:`~grad_guard.report.build_report` (``config=`` the
            run's settings, ``precision=``, ``counts=``...).

    Returns:
        The report, or ``None`` on other ranks than global zero.

    Example:
        >>> report_for_trainer(type("T", (), {"is_global_zero": False})(), None, GradientHistory())
    """
    if not bool(getattr(trainer, "is_global_zero", True)):
        return None
    precision = (
        kwargs.pop("precision", None) or str(getattr(trainer, "precision", "") or "") or None
    )
    report = build_report(history, model=pl_module, precision=precision, **kwargs)
    if print_report:
        report.print()
    target = directory or log_dir(trainer)
    if target:
        report.write(target)
        save_pictures(history, target)
    return report
