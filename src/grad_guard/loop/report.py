"""What a hand-written loop sees of a step: warnings, and the scalars written to a writer.

:class:`~grad_guard.loop.guard.GradientGuard` hands every
:class:`~grad_guard.core.step.StepOutcome` here once the engine has acted. Nothing here
may stop training: a failed check and a failed write each become one warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from grad_guard.core.events import GradientAnomalyWarning
from grad_guard.core.step import StepOutcome
from grad_guard.loggers import custom_scalars_layout, layout_for_parts, write_to

#: warnings point at the loop's call of ``GradientGuard.step`` (or ``flush``)
_STACKLEVEL = 4


def check_writer(writer: Any) -> Any:
    """``writer`` if scalars can go to it: ``add_scalar`` (a ``SummaryWriter``),
    ``log_metrics`` (a Lightning/Fabric logger), or ``None``.

    Raises:
        ValueError: for anything else.

    Example:
        >>> check_writer(None) is None
        True
        >>> check_writer(object())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `writer` must be a SummaryWriter (has `add_scalar`), a logger (has ...
    """
    if writer is not None and not (
        callable(getattr(writer, "add_scalar", None))
        or callable(getattr(writer, "log_metrics", None))
    ):
        raise ValueError(
            "`writer` must be a SummaryWriter (has `add_scalar`), a logger (has "
            f"`log_metrics`) or None, got {writer!r}"
        )
    return writer


def warn_outcome(outcome: StepOutcome) -> None:
    """Warn that the step's checks failed (if they did), then each warning the policy chose."""
    if outcome.error is not None:
        warnings.warn(
            f"grad_guard: this step's checks failed and were skipped "
            f"({type(outcome.error).__name__}: {outcome.error}); the gradients were left "
            "as they are. Training continues.",
            stacklevel=_STACKLEVEL,
        )
    for message in outcome.decision.warnings:
        warnings.warn(message, GradientAnomalyWarning, stacklevel=_STACKLEVEL)


def write_outcome(
    writer: Any, outcome: StepOutcome, layout_parts: tuple[Any, Any, Any] | None = None
) -> None:
    """Write the metrics of ``outcome`` to ``writer``; a failure is a warning, not an error.

    Args:
        writer: as :func:`check_writer` accepts it, not ``None``.
        outcome: the engine's outcome of the step.
        layout_parts: ``(monitor, detection, clipping)`` to write their custom-scalars
            layout first, when the writer takes one (``add_custom_scalars``); ``None``
            once it has been written.
    """
    try:
        if layout_parts is not None and callable(getattr(writer, "add_custom_scalars", None)):
            writer.add_custom_scalars(custom_scalars_layout(layout_for_parts(*layout_parts)))
        for log_step, metrics in outcome.metrics:
            write_to(writer, metrics, log_step)
    except Exception as err:  # logging must never kill training
        warnings.warn(
            f"grad_guard: logging failed this step and was skipped "
            f"({type(err).__name__}: {err}). Training continues.",
            stacklevel=_STACKLEVEL,
        )
