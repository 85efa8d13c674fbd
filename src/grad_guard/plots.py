"""Pictures of a :class:`~grad_guard.history.GradientHistory`: heatmap and gradient flow.

* :func:`heatmap_figure`: layers (rows, input at the top) x logged steps (columns),
  coloured by log10 of the gradient norm. Vanishing gradients show as a dark band at the
  input end, exploding ones as a bright band; non-finite cells are red with an ``x``,
  zero-gradient cells black and cells without a gradient light grey.
* :func:`flow_figure`: per layer, mean and max gradient norm over the recent window on
  a log scale (the classic "gradient flow" chart).

Each figure can be turned into an ``HWC`` ``uint8`` array for
``SummaryWriter.add_image(..., dataformats="HWC")`` with :func:`figure_to_array`, or
saved as PNG with :func:`save_png`. matplotlib is an optional dependency
(``pip install "grad-guard[plot]"``); it is imported on first use and drawn with the
Agg canvas directly, so no pyplot state or GUI backend is involved.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from grad_guard.history import GradientHistory

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

HEATMAP_TAG = "grad_guard/gradient_heatmap"
FLOW_TAG = "grad_guard/gradient_flow"
DEFAULT_DPI = 100

_NONFINITE_COLOR = "#e41a1c"
_ZERO_COLOR = "#000000"
_NO_GRAD_COLOR = "#d9d9d9"
_warned_missing = False


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "grad_guard's pictures need matplotlib, which is an optional extra: "
            'pip install "grad-guard[plot]"'
        ) from err
    return matplotlib, Figure


def heatmap_size(num_layers: int) -> tuple[int, int]:
    """Default ``(width, height)`` in pixels of the heatmap for ``num_layers`` rows.

    Example:
        >>> heatmap_size(3), heatmap_size(20), heatmap_size(500)
        ((800, 320), (800, 500), (800, 1200))
    """
    return 800, int(min(1200, max(320, 140 + 18 * num_layers)))


def _new_figure(size: tuple[int, int], dpi: int) -> Figure:
    _, figure_class = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    width, height = size
    figure = figure_class(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _tick_positions(count: int, most: int) -> list[int]:
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _layer_ticks(axis: Any, layers: Sequence[str], size: tuple[int, int], which: str) -> None:
    # a label needs about 11 px of height (y), or 22 px of width when rotated (x)
    room = size[1] - 120 if which == "y" else (size[0] - 120) // 2
    # tick labels dominate the drawing time: at most 40 of them
    positions = _tick_positions(len(layers), max(2, min(40, room // 11)))
    labels = [layers[i] if len(layers[i]) <= 28 else "..." + layers[i][-25:] for i in positions]
    if which == "y":
        axis.set_yticks(positions)
        axis.set_yticklabels(labels, fontsize=7)
    else:
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")


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
    matplotlib, _ = _matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    size = size or heatmap_size(len(history.layers))
    figure = _new_figure(size, dpi)
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
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=_NO_GRAD_COLOR)
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
            cmap=ListedColormap([_ZERO_COLOR, _NONFINITE_COLOR]),
            vmin=1.0,
            vmax=2.0,
            origin="upper",
        )
    if nonfinite.any() and nonfinite.size <= 20_000:
        # a marker as well as a colour, so NaN/Inf survive colour-blind eyes and greyscale
        ys, xs = np.nonzero(nonfinite)
        axes.scatter(xs, ys, marker="x", s=12, c="white", linewidths=0.8)

    steps = history.steps
    positions = _tick_positions(len(steps), 8)
    axes.set_xticks(positions)
    axes.set_xticklabels([str(steps[i]) for i in positions], fontsize=8)
    axes.set_xlabel("step")
    _layer_ticks(axes, history.layers, size, "y")
    axes.set_ylabel("layer (input at top)")
    axes.set_title(title, fontsize=10)
    legend = [
        Patch(facecolor=_NONFINITE_COLOR, label="NaN/Inf"),
        Patch(facecolor=_ZERO_COLOR, label="zero"),
        Patch(facecolor=_NO_GRAD_COLOR, label="no grad"),
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

    figure = _new_figure(size, dpi)
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
            c=_NONFINITE_COLOR,
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
    _layer_ticks(axes, history.layers, size, "x")
    axes.set_xlim(-0.6, max(len(x), 1) - 0.4)
    axes.set_xlabel("layer (input at left)")
    axes.set_ylabel("||grad||")
    axes.grid(True, axis="y", which="major", alpha=0.3)
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="x", color=_NONFINITE_COLOR, linestyle="", label="NaN/Inf"),
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


def figure_to_array(figure: Figure) -> np.ndarray:
    """Render ``figure`` to an ``(H, W, 3)`` ``uint8`` RGB array (``dataformats="HWC"``)."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(figure: Figure, path: str | os.PathLike[str]) -> str:
    """Write ``figure`` to ``path`` as PNG (same pixel size as :func:`figure_to_array`)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png", dpi=figure.dpi)
    return path


def save_pictures(
    history: GradientHistory, directory: str | os.PathLike[str], window: int = 20
) -> list[str]:
    """Save ``gradient_heatmap.png`` and ``gradient_flow.png`` into ``directory``."""
    directory = os.fspath(directory)
    return [
        save_png(heatmap_figure(history), os.path.join(directory, "gradient_heatmap.png")),
        save_png(flow_figure(history, window), os.path.join(directory, "gradient_flow.png")),
    ]


def add_images(
    writers: Sequence[Any], history: GradientHistory, step: int, window: int = 20
) -> bool:
    """Write the heatmap and the flow chart to each TensorBoard ``SummaryWriter``.

    Returns ``False`` (and warns once per process) when matplotlib is missing, or when
    there is nothing to draw yet.
    """
    global _warned_missing
    if not writers or not len(history):
        return False
    if not available():
        if not _warned_missing:
            _warned_missing = True
            warnings.warn(
                "grad_guard: matplotlib is not installed, so no gradient heatmap / flow "
                'images are written to TensorBoard. pip install "grad-guard[plot]"',
                stacklevel=2,
            )
        return False
    images = {
        HEATMAP_TAG: figure_to_array(heatmap_figure(history)),
        FLOW_TAG: figure_to_array(flow_figure(history, window)),
    }
    for writer in writers:
        for tag, image in images.items():
            writer.add_image(tag, image, global_step=step, dataformats="HWC")
    return True
