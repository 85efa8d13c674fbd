"""What :class:`~grad_guard.core.activations.ActivationHooks` reports for one layer.

The hooks keep raw rows on the device (a layer output's mean, spread and non-finite
count; an activation's saturated or dead count); :func:`combine_rows` folds the host
copies of those rows into one :class:`LayerActivations` per layer, weighting several
calls of one layer by their element (or unit) counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class LayerActivations:
    """One layer's activation statistics of one logging step (host floats).

    Attributes:
        mean: mean of the layer's output (NaN or Inf if any output was non-finite).
        std: standard deviation of the layer's output (population; NaN likewise).
        nonfinite_fraction: fraction of output elements that were NaN or Inf.
        saturated_fraction: fraction of the following saturating activation's outputs
            near its bounds; ``None`` when no saturating activation follows the layer.
        dead_fraction: fraction of the following ReLU-family activation's units that
            were 0 for the whole batch; ``None`` when none follows.
        activation: class name of the activation measured after the layer, if any.
    """

    mean: float
    std: float
    nonfinite_fraction: float
    saturated_fraction: float | None = None
    dead_fraction: float | None = None
    activation: str | None = None


def combine_rows(
    names: Sequence[str], rows: Sequence[tuple[int, str, int, str | None, Tensor]], host: Any
) -> dict[str, LayerActivations]:
    """One :class:`LayerActivations` per layer that was measured, in ``names`` order.

    Args:
        names: the layer names, indexed by the rows' layer index.
        rows: per hook call ``(layer index, kind, weight, activation name, device row)``,
            ``kind`` being ``"output"``, ``"saturated"`` or ``"dead"``.
        host: the host copy of each row's values, same order.
    """
    # layer -> [n, sum, sum of squares, nonfinite count]; (layer, kind) -> [weight, count]
    outputs: dict[int, list[float]] = {}
    fractions: dict[tuple[int, str], list[float]] = {}
    activation: dict[int, str] = {}
    for (layer, kind, weight, act, _), values in zip(rows, host):
        if kind == "output":
            mean, spread, nonfinite = values
            var = spread * spread / weight
            acc = outputs.setdefault(layer, [0.0, 0.0, 0.0, 0.0])
            acc[0] += weight
            acc[1] += weight * mean
            acc[2] += weight * (var + mean * mean)
            acc[3] += nonfinite  # a count
        else:
            acc = fractions.setdefault((layer, kind), [0.0, 0.0])
            acc[0] += weight
            acc[1] += values[0]  # a count
            activation.setdefault(layer, act or "")
    result = {}
    for layer, name in enumerate(names):
        if layer not in outputs and layer not in activation:
            continue
        n, total, squares, nonfinite = outputs.get(layer, [0.0, math.nan, math.nan, math.nan])
        mean = total / n if n else math.nan
        var = squares / n - mean * mean if n else math.nan
        sat, dead = fractions.get((layer, "saturated")), fractions.get((layer, "dead"))
        result[name] = LayerActivations(
            mean=mean,
            std=math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan,
            nonfinite_fraction=nonfinite / n if n else math.nan,
            saturated_fraction=sat[1] / sat[0] if sat else None,
            dead_fraction=dead[1] / dead[0] if dead else None,
            activation=activation.get(layer),
        )
    return result
