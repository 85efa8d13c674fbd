"""Shared figure plumbing: matplotlib on demand, an Agg canvas, ticks, PNG and arrays."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

DEFAULT_DPI = 100
NONFINITE_COLOR = "#e41a1c"
ZERO_COLOR = "#000000"
NO_GRAD_COLOR = "#d9d9d9"


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def matplotlib_modules() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "grad_guard's pictures need matplotlib, which is an optional extra: "
            'pip install "grad-guard[plot]"'
        ) from err
    return matplotlib, Figure


def new_figure(size: tuple[int, int], dpi: int) -> Figure:
    _, figure_class = matplotlib_modules()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    width, height = size
    figure = figure_class(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def tick_positions(count: int, most: int) -> list[int]:
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def layer_ticks(axis: Any, layers: Sequence[str], size: tuple[int, int], which: str) -> None:
    # a label needs about 11 px of height (y), or 22 px of width when rotated (x)
    room = size[1] - 120 if which == "y" else (size[0] - 120) // 2
    # tick labels dominate the drawing time: at most 40 of them
    positions = tick_positions(len(layers), max(2, min(40, room // 11)))
    labels = [layers[i] if len(layers[i]) <= 28 else "..." + layers[i][-25:] for i in positions]
    if which == "y":
        axis.set_yticks(positions)
        axis.set_yticklabels(labels, fontsize=7)
    else:
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")


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
