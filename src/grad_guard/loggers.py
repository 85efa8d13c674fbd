"""Write grad_guard's numbers to whatever loggers the Trainer has.

Scalars go to every logger through ``logger.log_metrics`` (TensorBoard, CSV, W&B,
MLflow...). TensorBoard-only extras (the custom-scalars layout, raw histograms, images,
text) go to loggers whose ``experiment`` is a ``SummaryWriter``-like object and are
skipped for the rest. Loggers are found by duck typing, so the same code serves the
``lightning`` and ``pytorch_lightning`` namespaces.

Only global rank zero writes.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.metrics import (  # noqa: F401  (re-exported: one home for tag names)
    CLIP_CLIPPED_FRACTION,
    CLIP_POST_NORM,
    CLIP_PRE_NORM,
    CLIP_THRESHOLD,
    GRAD_HIST,
    GRAD_NORM,
    GRAD_TO_PARAM,
    LOG10_GRAD_NORM,
    PARAM_NORM,
    SUMMARY,
    UPDATE_RATIO,
    clip_metrics,
    layer_metrics,
    tag,
)

_layout_written: weakref.WeakSet[Any] = weakref.WeakSet()
_warned_no_logger: weakref.WeakSet[Any] = weakref.WeakSet()


def is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def warn_rank_zero(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` on global rank zero only, so N processes don't warn N times."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(message, category, stacklevel=3)


def tensorboard_writers(trainer: Any) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (rank zero only)."""
    if not is_global_zero(trainer):
        return []
    writers = []
    for logger in getattr(trainer, "loggers", []):
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        writer = logger.experiment
        if hasattr(writer, "add_histogram_raw"):
            writers.append(writer)
    return writers


def warn_if_no_logger(trainer: Any) -> None:
    """Warn once per trainer when there is nowhere to write."""
    if getattr(trainer, "loggers", None) or trainer in _warned_no_logger:
        return
    _warned_no_logger.add(trainer)
    warn_rank_zero(
        "grad_guard: the Trainer has no logger, so gradient statistics are computed for "
        "detection/clipping/report only and nothing is logged. Pass `logger=True` or a "
        "TensorBoardLogger to see them.",
    )


def log_scalars(trainer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Send plain scalars to every logger of ``trainer`` (rank zero only).

    TensorBoard loggers get all values in one summary event (see :func:`write_scalars`);
    other loggers get them through ``logger.log_metrics``.
    """
    if not metrics or not is_global_zero(trainer):
        return
    for logger in getattr(trainer, "loggers", []):
        plain_tensorboard = type(logger).__name__ == "TensorBoardLogger" and not getattr(
            logger, "_prefix", ""
        )
        if plain_tensorboard and write_scalars(logger.experiment, metrics, step):
            continue
        logger.log_metrics(dict(metrics), step=step)


def write_scalars(writer: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Write ``metrics`` to a ``torch.utils.tensorboard.SummaryWriter`` as one event.

    ``add_scalar`` writes one event per tag; a model with hundreds of layers logs
    thousands of tags per step, and one summary holding all values is ~25x cheaper.
    TensorBoard reads it back tag by tag as usual. Returns False (nothing written) for
    writers this does not apply to, such as tensorboardX's.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> write_scalars(SummaryWriter(tempfile.mkdtemp()), {"grad_norm/fc": 0.5}, step=3)
        True
    """
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None or not type(writer).__module__.startswith("torch.utils.tensorboard"):
        return False
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(
        value=[Summary.Value(tag=name, simple_value=float(v)) for name, v in metrics.items()]
    )
    file_writer().add_summary(summary, step)
    return True


def write_to(writer: Any, metrics: Mapping[str, float], step: int) -> None:
    """Scalars to a ``SummaryWriter`` (one event), a tensorboardX-like writer, or a logger.

    Example:
        >>> class Logger:
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        >>> write_to(Logger(), {"grad_norm/fc": 0.5}, step=3)
        3 {'grad_norm/fc': 0.5}
    """
    if not metrics or write_scalars(writer, metrics, step):
        return
    if callable(getattr(writer, "add_scalar", None)):
        for name, value in metrics.items():
            writer.add_scalar(name, value, global_step=step)
    else:
        writer.log_metrics(dict(metrics), step=step)


_OPTIMIZER = r"(optimizer_\d+/)?"  # the optional optimizer level of a tag


def monitor_charts(param_norms: bool = True, update_ratio: bool = True) -> dict[str, list[str]]:
    """Custom-scalars charts of the per-layer quantities: title -> tag regexes."""
    charts = {
        "log10 gradient norm per layer (all scales visible)": [rf"^{LOG10_GRAD_NORM}/"],
        "gradient norm per layer": [rf"^{GRAD_NORM}/"],
        "total gradient norm": [rf"^{SUMMARY}/{_OPTIMIZER}total_grad_norm$"],
    }
    if param_norms:
        charts["parameter norm per layer"] = [rf"^{PARAM_NORM}/"]
        charts["gradient / parameter norm"] = [rf"^{GRAD_TO_PARAM}/"]
    if update_ratio:
        charts["update / parameter ratio (healthy ~1e-3)"] = [rf"^{UPDATE_RATIO}/"]
    return charts


def clipping_charts() -> dict[str, list[str]]:
    """Custom-scalars charts of a clipper."""
    prefix = rf"^{SUMMARY}/{_OPTIMIZER}"
    return {
        "clipping: total gradient norm before / after": [
            rf"{prefix}{CLIP_PRE_NORM}$",
            rf"{prefix}{CLIP_POST_NORM}$",
        ],
        "clipping: threshold in force": [rf"{prefix}{CLIP_THRESHOLD}$"],
        "clipping: fraction of steps clipped": [rf"{prefix}{CLIP_CLIPPED_FRACTION}$"],
    }


def anomaly_charts() -> dict[str, list[str]]:
    """Custom-scalars charts of anomaly detection."""
    return {
        "anomalies (steps)": [
            rf"^{SUMMARY}/anomalies/",
            rf"^{SUMMARY}/skipped_steps$",
            rf"^{SUMMARY}/rollbacks$",
        ]
    }


def layout_for_parts(monitor: Any, detection: Any, clipping: Any) -> dict[str, list[str]]:
    """The charts of the parts an engine runs (``None`` for a part that is off)."""
    charts: dict[str, list[str]] = {}
    if monitor is not None:
        charts.update(monitor_charts(monitor.log_param_norms, monitor.log_update_ratio))
    if clipping is not None:
        charts.update(clipping_charts())
    if detection is not None:
        charts.update(anomaly_charts())
    return charts


def custom_scalars_layout(charts: Mapping[str, list[str]]) -> dict[str, Any]:
    """The ``add_custom_scalars`` layout: one "grad_guard" category of multiline charts."""
    return {"grad_guard": {title: ["Multiline", regexes] for title, regexes in charts.items()}}


def layout_charts(trainer: Any) -> dict[str, list[str]]:
    """Multiline charts wanted by all grad_guard callbacks of ``trainer``: title -> regexes."""
    charts: dict[str, list[str]] = {}
    for callback in getattr(trainer, "callbacks", []):
        provider = getattr(callback, "layout_charts", None)
        if callable(provider):
            for title, regexes in provider().items():
                charts.setdefault(title, [])
                charts[title].extend(r for r in regexes if r not in charts[title])
    return charts


def write_layout(trainer: Any) -> None:
    """Register the custom-scalars layout once per writer.

    ``add_custom_scalars`` may be called only once per writer, so the layout gathers the
    charts of every grad_guard callback on the Trainer.
    """
    for writer in tensorboard_writers(trainer):
        if writer in _layout_written:
            continue
        charts = layout_charts(trainer)
        if not charts:
            continue
        writer.add_custom_scalars(custom_scalars_layout(charts))
        _layout_written.add(writer)


def histogram_buckets(values: Tensor, bins: int) -> dict[str, Any]:
    """Histogram of ``values`` computed on their device, in ``add_histogram_raw``'s format.

    One small device-to-host copy of the bucket counts and five summary numbers; no
    numpy binning of the raw values.

    Example:
        >>> h = histogram_buckets(torch.tensor([0.0, 1.0, 1.0, 2.0]), bins=2)
        >>> h["num"], h["bucket_counts"]
        (4, [1.0, 3.0])
    """
    flat = values.detach().reshape(-1).float()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return {}
    low_high = torch.stack([flat.min(), flat.max(), flat.sum(), flat.square().sum()])
    low, high, total, total_sq = low_high.cpu().tolist()
    if high <= low:
        high = low + 1e-12
    counts = torch.histc(flat, bins=bins, min=low, max=high).cpu().tolist()
    width = (high - low) / bins
    limits = [low + width * (i + 1) for i in range(bins)]
    return {
        "min": low,
        "max": high,
        "num": int(flat.numel()),
        "sum": total,
        "sum_squares": total_sq,
        "bucket_limits": limits,
        "bucket_counts": counts,
    }


def write_histograms(
    trainer: Any, histograms: Iterable[tuple[str, Sequence[Tensor]]], bins: int, step: int
) -> int:
    """Write one raw histogram per ``(tag, tensors)``; returns how many were written."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return 0
    written = 0
    for name, tensors in histograms:
        tensors = [t for t in tensors if not t.is_sparse]  # left out of the norms too
        if not tensors:
            continue
        data = histogram_buckets(torch.cat([t.detach().reshape(-1) for t in tensors]), bins)
        if not data:
            continue
        for writer in writers:
            writer.add_histogram_raw(name, global_step=step, **data)
        written += 1
    return written
