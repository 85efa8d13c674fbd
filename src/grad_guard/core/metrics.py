"""Tag names and the scalars of a logging step, built from host values (no tensors).

TensorBoard groups scalars by the text before the first ``/``, so every layer of one
quantity lands in one section: ``grad_norm/<layer>``, ``param_norm/<layer>``, ...
With several optimizers an ``optimizer_<i>/`` level follows the prefix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

GRAD_NORM = "grad_norm"
LOG10_GRAD_NORM = "grad_norm_log10"
PARAM_NORM = "param_norm"
GRAD_TO_PARAM = "grad_to_param"
UPDATE_RATIO = "update_ratio"
GRAD_HIST = "grad_hist"
SUMMARY = "grad_guard"  # totals, clipping, anomaly counters
CLIP_PRE_NORM = "clip/pre_norm"
CLIP_POST_NORM = "clip/post_norm"
CLIP_THRESHOLD = "clip/threshold"
CLIP_CLIPPED_FRACTION = "clip/clipped_fraction"
#: counters logged as ``grad_guard/anomalies/<name>`` (cumulative steps)
ANOMALY_COUNTERS = ("nonfinite", "exploding", "vanishing", "loss_spike", "amp_overflow")
#: counters logged as ``grad_guard/<name>``
STEP_COUNTERS = ("skipped_steps", "rollbacks")


def tag(prefix: str, name: str, optimizer_label: str = "") -> str:
    """Build a tag, e.g. ``tag("grad_norm", "encoder.0", "optimizer_1")``.

    Example:
        >>> tag("grad_norm", "encoder.0")
        'grad_norm/encoder.0'
        >>> tag("grad_norm", "gen.fc", "optimizer_1")
        'grad_norm/optimizer_1/gen.fc'
    """
    return f"{prefix}/{optimizer_label}/{name}" if optimizer_label else f"{prefix}/{name}"


def log10(value: float) -> float:
    """``log10`` of a norm; ``-inf`` for 0, NaN stays NaN (TensorBoard shows both)."""
    if math.isnan(value):
        return value
    return math.log10(value) if value > 0 else -math.inf


def layer_metrics(
    layer_names: Sequence[str],
    logged: Sequence[bool],
    grad_norms: Sequence[float],
    total_norm: float,
    param_norms: Sequence[float] | None = None,
    optimizer_label: str = "",
) -> dict[str, float]:
    """The per-layer scalars of one logging step (host floats in, tags out).

    ``grad_norm_log10/<layer>`` carries the same norm on a log scale, so that layers
    sixteen orders of magnitude apart are all visible in one chart.

    Example:
        >>> layer_metrics(["fc"], [True], [0.01], 0.01, [2.0])
        {'grad_guard/total_grad_norm': 0.01, 'grad_norm/fc': 0.01, 'grad_norm_log10/fc': -2.0, 'param_norm/fc': 2.0, 'grad_to_param/fc': 0.005}
    """
    metrics = {tag(SUMMARY, "total_grad_norm", optimizer_label): total_norm}
    for i, name in enumerate(layer_names):
        if not logged[i]:
            continue
        metrics[tag(GRAD_NORM, name, optimizer_label)] = grad_norms[i]
        metrics[tag(LOG10_GRAD_NORM, name, optimizer_label)] = log10(grad_norms[i])
        if param_norms is not None:
            metrics[tag(PARAM_NORM, name, optimizer_label)] = param_norms[i]
            metrics[tag(GRAD_TO_PARAM, name, optimizer_label)] = grad_norms[i] / max(
                param_norms[i], 1e-12
            )
    return metrics


def clip_metrics(
    pre_norm: float,
    post_norm: float,
    threshold: float,
    clipped_fraction: float,
    optimizer_label: str = "",
) -> dict[str, float]:
    """The clipping scalars of one logging step; no threshold while none is in force.

    Example:
        >>> sorted(clip_metrics(2.0, 1.0, float("inf"), 0.5))
        ['grad_guard/clip/clipped_fraction', 'grad_guard/clip/post_norm', 'grad_guard/clip/pre_norm']
    """
    metrics = {
        tag(SUMMARY, CLIP_PRE_NORM, optimizer_label): pre_norm,
        tag(SUMMARY, CLIP_POST_NORM, optimizer_label): post_norm,
        tag(SUMMARY, CLIP_CLIPPED_FRACTION, optimizer_label): clipped_fraction,
    }
    if math.isfinite(threshold):
        metrics[tag(SUMMARY, CLIP_THRESHOLD, optimizer_label)] = threshold
    return metrics


def counter_metrics(counts: Mapping[str, int]) -> dict[str, float]:
    """``grad_guard/anomalies/<kind>``, ``grad_guard/skipped_steps``, ``grad_guard/rollbacks``.

    Example:
        >>> counter_metrics({"nonfinite": 2})["grad_guard/anomalies/nonfinite"]
        2.0
    """
    metrics = {
        tag(SUMMARY, f"anomalies/{name}"): float(counts.get(name, 0)) for name in ANOMALY_COUNTERS
    }
    metrics.update({tag(SUMMARY, name): float(counts.get(name, 0)) for name in STEP_COUNTERS})
    return metrics


def update_ratio_metrics(
    layer_names: Sequence[str], logged: Sequence[bool], ratios: Sequence[float], label: str = ""
) -> dict[str, float]:
    """``update_ratio/<layer>`` for the logged layers."""
    return {
        tag(UPDATE_RATIO, name, label): ratios[i]
        for i, name in enumerate(layer_names)
        if logged[i]
    }


def step_metrics(
    layer_names: Sequence[str],
    logged: Sequence[bool],
    values: Mapping[str, list[float]],
    label: str = "",
    monitor: bool = True,
    param_norms: bool = True,
    counts: Mapping[str, int] | None = None,
) -> dict[str, float]:
    """Every scalar of one logging step from the host copy the engine made.

    Args:
        layer_names: the layers of the pass, forward order.
        logged: per layer, whether it is reported.
        values: the host copy: ``norms``, ``total`` and, when present, ``params``,
            ``clip`` (pre, post, threshold, clipped since last log), ``clip_steps``.
        label: the optimizer level of the tags.
        monitor: include the per-layer scalars.
        param_norms: include ``param_norm`` and ``grad_to_param``.
        counts: anomaly counters to include, or ``None``.
    """
    metrics: dict[str, float] = {}
    if monitor:
        metrics.update(
            layer_metrics(
                layer_names,
                logged,
                values["norms"],
                values["total"][0],
                values.get("params") if param_norms else None,
                label,
            )
        )
    if "clip" in values:
        pre, post, threshold, since = values["clip"]
        steps = values["clip_steps"][0]
        metrics.update(clip_metrics(pre, post, threshold, since / max(steps, 1.0), label))
    if counts is not None:
        metrics.update(counter_metrics(counts))
    return metrics
