"""The demo's end-of-fit health report: GradGuard's, with pictures only where they are shown.

``GradGuard(report=True)`` builds the report at the end of ``fit``, writes it next to
the logs and draws its heatmap and flow PNGs. Drawing costs more than training the
demo's small models, and only one run of each row (its first seed) is meant to be
looked at, so the demo runs ``GradGuard(report=False)`` and attaches
:class:`SeedReport` after it: the same :func:`grad_guard.report.build_report` on the
guard's history, counts, clipped fraction and events, written into the run folder, with
the PNGs for the showcase run only.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from grad_guard.callbacks.guard import GradGuard


class SeedReport(Callback):
    """Build and write ``guard``'s health report at the end of ``fit``.

    Args:
        guard: the run's GradGuard (built with ``report=False``).
        pictures: also save the report's heatmap and flow PNGs.

    Attributes:
        report: the report, once ``fit`` has ended (``None`` before, or without a monitor).

    Example:
        >>> hook = SeedReport(GradGuard(clipping=None, report=False), pictures=False)
        >>> hook.report is None
        True
    """

    def __init__(self, guard: GradGuard, pictures: bool) -> None:
        self.guard = guard
        self.pictures = pictures
        self.report: Any = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        from grad_guard.report import build_report, log_dir

        guard = self.guard
        history = getattr(guard.monitor, "history", None)
        if history is None:
            return
        self.report = build_report(
            history,
            model=pl_module,
            precision=str(getattr(trainer, "precision", "") or "") or None,
            counts=guard.detection.counts if guard.detection else None,
            clipped_fraction=guard.clipping.clipped_fraction if guard.clipping else None,
            events=guard.detection.events if guard.detection else None,
        )
        target = log_dir(trainer)
        if target:
            self.report.write(target)
            if self.pictures:
                from grad_guard.report.files import save_pictures

                save_pictures(history, target)
