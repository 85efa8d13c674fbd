"""The gradient-flow chart: per layer, mean and max gradient norm over a recent window."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from grad_guard.history import GradientHistory
from grad_guard.plots.figure import DEFAULT_DPI, NONFINITE_COLOR, layer_ticks, new_figure

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def flow_figure(
    history: GradientHistory,
    window: int = 20,
    size: tuple[int, int] = (800, 400),
    dpi: int = DEFAULT_DPI,
    title: str | None = None,
) -> Figure:
    """Per layer, mean and max gradient norm over the last ``window`` kept steps (log y).

    Layers without any finite, positive norm in the window are marked at the bottom
    (``x`` for non-finite, ``o`` for zero / no gradient).

    Args:
        history: the data.
        window: number of most recent kept steps to summarise (>= 1).
        size: ``(width, height)`` in pixels.
        dpi: resolution used to turn ``size`` into inches.
        title: axes title; default says the window.

    Raises:
        ImportError: if matplotlib is not installed (names the ``plot`` extra).

    Example:
        >>> history = GradientHistory()
        >>> history.record(0, ["fc1", "fc2"], [1e-3, 1.0])
        >>> flow_figure(history).axes[0].get_yscale()
        'log'
    """
    from matplotlib.lines import Line2D

    figure = new_figure(size, dpi)
    axes = figure.add_subplot(1, 1, 1)
    values = history.matrix("grad_norm")[:, -max(1, int(window)) :]
    data = values.filled(np.nan)
    usable = np.isfinite(data) & (data > 0.0)
    count = usable.sum(axis=1)
    with np.errstate(invalid="ignore"):
        means = np.where(
            count > 0, np.where(usable, data, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan
        )
        maxes = np.where(
            count > 0, np.where(usable, data, -np.inf).max(axis=1, initial=-np.inf), np.nan
        )
    x = np.arange(len(history.layers))
    if 0 < len(x) <= 100:
        axes.bar(x, np.nan_to_num(maxes, nan=0.0), width=0.8, color="#9ecae1", label="max")
        axes.bar(x, np.nan_to_num(means, nan=0.0), width=0.5, color="#08519c", label="mean")
    elif len(x):  # one line per layer: a thousand bar patches take seconds to draw
        floor = np.nanmin(means) / 3 if np.isfinite(means).any() else 1e-3
        axes.vlines(x, floor, np.nan_to_num(maxes, nan=floor), color="#9ecae1", label="max")
        axes.plot(x, means, color="#08519c", linewidth=1.0, label="mean")
    axes.set_yscale("log")
    positive = np.concatenate([means[np.isfinite(means)], maxes[np.isfinite(maxes)]])
    low = positive.min() / 3 if positive.size else 1e-3
    high = positive.max() * 3 if positive.size else 1.0
    axes.set_ylim(low, high)
    nonfinite = (~np.ma.getmaskarray(values) & ~np.isfinite(data)).any(axis=1)
    dead = (count == 0) & ~nonfinite
    if nonfinite.any():
        axes.scatter(
            x[nonfinite],
            np.full(nonfinite.sum(), low * 1.3),
            marker="x",
            c=NONFINITE_COLOR,
            zorder=3,
        )
    if dead.any():
        axes.scatter(
            x[dead],
            np.full(dead.sum(), low * 1.3),
            marker="o",
            facecolors="none",
            edgecolors="k",
            zorder=3,
        )
    layer_ticks(axes, history.layers, size, "x")
    axes.set_xlim(-0.6, max(len(x), 1) - 0.4)
    axes.set_xlabel("layer (input at left)")
    axes.set_ylabel("||grad||")
    axes.grid(True, axis="y", which="major", alpha=0.3)
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="x", color=NONFINITE_COLOR, linestyle="", label="NaN/Inf"),
        Line2D(
            [],
            [],
            marker="o",
            color="k",
            markerfacecolor="none",
            linestyle="",
            label="zero/no grad",
        ),
    ]
    axes.legend(handles=handles, fontsize=7, loc="upper left", ncol=4)
    kept = values.shape[1]
    axes.set_title(
        title or f"gradient flow: mean and max over the last {kept} logged steps", fontsize=10
    )
    figure.tight_layout()
    return figure
