"""What every diagnosis rule receives (:class:`Evidence`) and where rules draw lines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grad_guard.history import GradientHistory
from grad_guard.report.findings import Finding, LayerRow
from grad_guard.report.model_info import NORM_NAME, ModelInfo
from grad_guard.report.run_config import RunConfig

HEALTHY_UPDATE_RATIO = 1e-3
"""A typical healthy ``||delta theta|| / ||theta||`` per step."""


@dataclass
class Thresholds:
    """Where the rules draw their lines (defaults suit most runs).

    Attributes:
        vanishing_orders: input-end layers this many orders of magnitude below the
            output end count as vanishing.
        spike_factor: a total norm this many times the median of the previous steps is
            a spike.
        drift_factor: the median total norm of the last quarter vs the first quarter
            changing by this factor is a drift in scale.
        frequent_clipping: clipped fraction above which clipping is "frequent".
        dead_steps: consecutive logged steps with a zero/no gradient that make a layer
            dead.
        update_ratio_factor: median update ratio this many times above or below 1e-3 is
            "far" from healthy.
    """

    vanishing_orders: float = 3.0
    spike_factor: float = 5.0
    drift_factor: float = 10.0
    frequent_clipping: float = 0.5
    dead_steps: int = 5
    update_ratio_factor: float = 30.0


class Evidence:
    """Everything a rule may look at, with the numbers several rules share computed once.

    Attributes:
        history: the per-layer norms.
        rows: the report's table rows (rules may add flags).
        info: the model's structure, ``None`` when only event files are at hand.
        limits: the thresholds.
        totals: counters (``nonfinite``, ``exploding``, ...) and ``clipped_fraction``.
        precision: the run's precision, if known.
        config: the run's own grad_guard settings, if known: advice never recommends
            what the run already uses.
        profile: layer -> median finite, positive gradient norm.
        weight_layers: layers holding Linear/Conv weights, forward order.
        total_norms: the total gradient norm per kept column.
        activations: per-layer activation statistics (ActivationMonitor), if given.
    """

    def __init__(
        self,
        history: GradientHistory,
        rows: list[LayerRow],
        info: ModelInfo | None,
        limits: Thresholds,
        totals: dict[str, Any],
        precision: str | None = None,
        config: RunConfig | None = None,
        activations: Any = None,
    ) -> None:
        self.history = history
        self.rows = rows
        self.info = info
        self.limits = limits
        self.totals = totals
        self.precision = precision
        self.config = config
        self.activations = activations
        self._by_name = {r.name: r for r in rows}
        grads = history.matrix("grad_norm").filled(np.nan)
        profile = []
        for i in range(len(history.layers)):
            values = finite_positive(grads[i])
            profile.append(float(np.median(values)) if values.size else math.nan)
        self.profile = dict(zip(history.layers, profile))
        self.weight_layers = _weight_layers(history.layers, info)
        self.total_norms = history.total_norm_array()

    def row(self, name: str) -> LayerRow | None:
        """The table row of layer ``name``."""
        return self._by_name.get(name)

    def depth_profile(self) -> list[tuple[str, float]]:
        """(layer, median norm) of weight layers with a usable median, forward order."""
        return [
            (n, self.profile[n])
            for n in self.weight_layers
            if math.isfinite(self.profile.get(n, math.nan))
        ]

    @property
    def clip_algorithm(self) -> str | None:
        """The clipping algorithm the run used (``"AutoClip"``...), if known."""
        return self.config.clip_algorithm if self.config is not None else None


Rule = Callable[[Evidence], list[Finding]]
"""A diagnosis rule: evidence in, zero or more findings out."""


def finite_positive(values: np.ndarray) -> np.ndarray:
    """The finite values above 0."""
    return values[np.isfinite(values) & (values > 0)]


def _weight_layers(layers: Sequence[str], info: ModelInfo | None) -> list[str]:
    """Layers holding Linear/Conv weights (normalization layers distort the depth trend)."""
    if info is not None and info.weight_layers:
        paths = set(info.weight_layers)
        chosen = [name for name in layers if _strip_label(name) in paths]
        if len(chosen) < 2:  # the model given is a wrapper's child, or wraps the monitored one
            chosen = [
                name
                for name in layers
                if any(
                    _strip_label(name).endswith("." + p) or p.endswith("." + _strip_label(name))
                    for p in paths
                )
            ]
        if len(chosen) >= 2:
            return chosen
    return [name for name in layers if not NORM_NAME.search(_strip_label(name))]


def _strip_label(name: str) -> str:
    return name.split("/", 1)[1] if name.startswith("optimizer_") and "/" in name else name


def fmt(value: float | None) -> str:
    """A number for a sentence or a table cell: two significant digits, ``-`` for none.

    Example:
        >>> fmt(0.000123), fmt(float("inf")), fmt(None), fmt(0.0)
        ('0.00012', 'inf', '-', '0')
    """
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2g}" if value != 0 else "0"


def names(layers: Sequence[str], most: int = 4) -> str:
    """Layer names for a sentence, shortened in the middle when there are many.

    Example:
        >>> names(["a", "b", "c", "d", "e", "f"])
        'a, b, c, ... (3 more), f'
    """
    if len(layers) <= most:
        return ", ".join(layers)
    return ", ".join(layers[: most - 1]) + f", ... ({len(layers) - most + 1} more), {layers[-1]}"
