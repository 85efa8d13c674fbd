"""The layer x step heatmap of log10 gradient norm (input end on top)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from grad_guard.history import GradientHistory
from grad_guard.plots.figure import (
    DEFAULT_DPI,
    NO_GRAD_COLOR,
    NONFINITE_COLOR,
    ZERO_COLOR,
    layer_ticks,
    matplotlib_modules,
    new_figure,
    tick_positions,
)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def heatmap_size(num_layers: int) -> tuple[int, int]:
    """Default ``(width, height)`` in pixels of the heatmap for ``num_layers`` rows.

    Example:
        >>> heatmap_size(3), heatmap_size(20), heatmap_size(500)
        ((800, 320), (800, 500), (800, 1200))
    """
    return 800, int(min(1200, max(320, 140 + 18 * num_layers)))


def heatmap_figure(
    history: GradientHistory,
    size: tuple[int, int] | None = None,
    dpi: int = DEFAULT_DPI,
    title: str = "log10 gradient norm per layer",
) -> Figure:
    """Layer x step heatmap of ``log10`` gradient norm (first layer, the input end, on top).

    The image has one row per layer of ``history`` (``history.layers``, forward order)
    and one column per kept logged step.

    Args:
        history: the data.
        size: ``(width, height)`` in pixels; default :func:`heatmap_size`.
        dpi: resolution used to turn ``size`` into inches.
        title: axes title.

    Raises:
        ImportError: if matplotlib is not installed (names the ``plot`` extra).

    Example:
        >>> history = GradientHistory()
        >>> for step in range(3):
        ...     history.record(step, ["fc1", "fc2"], [1e-6, float("nan") if step == 2 else 1.0])
        >>> figure = heatmap_figure(history)
        >>> figure.axes[0].images[0].get_array().shape  # layers x steps
        (2, 3)
    """
    matplotlib, _ = matplotlib_modules()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    size = size or heatmap_size(len(history.layers))
    figure = new_figure(size, dpi)
    axes = figure.add_subplot(1, 1, 1)
    values = history.matrix("grad_norm")
    data = values.filled(np.nan)
    absent = np.ma.getmaskarray(values)
    nonfinite = ~absent & ~np.isfinite(data)
    zero = ~absent & (data == 0.0)
    positive = ~absent & np.isfinite(data) & (data > 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(positive, np.log10(np.where(positive, data, 1.0)), np.nan)
    shown = np.ma.masked_invalid(logs)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NO_GRAD_COLOR)
    finite_logs = logs[positive]
    vmin, vmax = (finite_logs.min(), finite_logs.max()) if finite_logs.size else (-1.0, 1.0)
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    rows = data.shape[0] if data.size else len(history.layers)
    image = axes.imshow(
        shown if data.size else np.ma.masked_all((max(rows, 1), 1)),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        origin="upper",
    )
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    colorbar.set_label("log10 ||grad||")

    overlay = np.zeros(data.shape, dtype=float)
    overlay[zero] = 1.0
    overlay[nonfinite] = 2.0
    if zero.any() or nonfinite.any():
        axes.imshow(
            np.ma.masked_equal(overlay, 0.0),
            aspect="auto",
            interpolation="nearest",
            cmap=ListedColormap([ZERO_COLOR, NONFINITE_COLOR]),
            vmin=1.0,
            vmax=2.0,
            origin="upper",
        )
    if nonfinite.any() and nonfinite.size <= 20_000:
        # a marker as well as a colour, so NaN/Inf survive colour-blind eyes and greyscale
        ys, xs = np.nonzero(nonfinite)
        axes.scatter(xs, ys, marker="x", s=12, c="white", linewidths=0.8)

    steps = history.steps
    positions = tick_positions(len(steps), 8)
    axes.set_xticks(positions)
    axes.set_xticklabels([str(steps[i]) for i in positions], fontsize=8)
    axes.set_xlabel("step")
    layer_ticks(axes, history.layers, size, "y")
    axes.set_ylabel("layer (input at top)")
    axes.set_title(title, fontsize=10)
    legend = [
        Patch(facecolor=NONFINITE_COLOR, label="NaN/Inf"),
        Patch(facecolor=ZERO_COLOR, label="zero"),
        Patch(facecolor=NO_GRAD_COLOR, label="no grad"),
    ]
    axes.legend(
        handles=legend,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.06),
        ncol=3,
        fontsize=7,
        frameon=False,
        borderaxespad=0.0,
    )
    figure.tight_layout()
    return figure
