"""The demo's comparison figure: every row's gradient flow in one picture (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from grad_guard.demo.rows import DemoRow

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def comparison_figure(
    rows: Sequence[DemoRow], size: tuple[int, int] = (1500, 560), dpi: int = 100
) -> Figure:
    """One figure comparing the runs' gradient flow, one line per run (log scales).

    Panels: per weight layer, the gradient norm at step 0 and its median over training
    (input at the left; a vanishing run slopes down towards the input); and the total
    gradient norm of every step (an ``x`` marks the step a run's loss became NaN/Inf).
    Unclipped runs are solid lines, clipped runs dashed. Each row is drawn from its
    showcase run (its first seed), the one whose traces the demo keeps.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 3, width_ratios=(1, 1, 1.25))
    first = figure.add_subplot(grid[0])
    second = figure.add_subplot(grid[1], sharey=first)
    third = figure.add_subplot(grid[2])
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for row, color in zip(rows, colors):
        run = row.runs[0]
        style = "--" if row.clip_algorithm else "-"
        label = row.name + (f" (NaN at step {run.diverged_at})" if run.diverged_at else "")
        for axes, values in ((first, run.step0_norms), (second, run.median_norms)):
            data = np.asarray(values, dtype=float)
            x = np.arange(1, len(data) + 1)
            shown = np.where(np.isfinite(data) & (data > 0), data, np.nan)
            axes.plot(x, shown, style, color=color, marker="o", markersize=2.5, linewidth=1.3)
        totals = np.asarray(run.total_norms, dtype=float)
        finite = np.where(np.isfinite(totals) & (totals > 0), totals, np.nan)
        third.plot(np.arange(len(totals)), finite, style, color=color, linewidth=1.0, label=label)
        if run.diverged_at is not None:
            third.plot(
                [run.diverged_at],
                [np.nanmax(finite) if np.isfinite(finite).any() else 1.0],
                "x",
                color=color,
                markersize=9,
                markeredgewidth=2,
            )
    first.set_title("per-layer gradient norm at step 0", fontsize=10)
    second.set_title("per-layer median gradient norm over training", fontsize=10)
    third.set_title("total gradient norm per step (before clipping)", fontsize=10)
    for axes in (first, second):
        axes.set_xlabel("weight layer (input at left)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, which="major", alpha=0.3)
    first.set_ylabel("||grad|| (log)")
    second.tick_params(labelleft=False)
    for axes in (first, second, third):
        axes.set_yscale("log")
    third.set_xlabel("step")
    third.grid(True, which="major", alpha=0.3)
    handles, labels = third.get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(4, max(1, len(rows))),
        fontsize=8,
        frameon=False,
    )
    figure.suptitle(
        "grad-guard demo: gradient flow, first seed of each row (solid: no clipping, dashed: clipped)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    return figure
