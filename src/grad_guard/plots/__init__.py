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
from typing import Any

from grad_guard.history import GradientHistory
from grad_guard.plots.figure import DEFAULT_DPI, available, figure_to_array, save_png
from grad_guard.plots.flow import flow_figure
from grad_guard.plots.heatmap import heatmap_figure, heatmap_size

HEATMAP_TAG = "grad_guard/gradient_heatmap"
FLOW_TAG = "grad_guard/gradient_flow"

_warned_missing = False

__all__ = [
    "DEFAULT_DPI",
    "FLOW_TAG",
    "HEATMAP_TAG",
    "add_images",
    "available",
    "figure_to_array",
    "flow_figure",
    "heatmap_figure",
    "heatmap_size",
    "save_pictures",
    "save_png",
]


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
