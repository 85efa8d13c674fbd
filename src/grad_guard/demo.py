"""``grad-guard demo``: reproduce vanishing and exploding gradients, and their fixes.

The demo trains the experiment matrix of :func:`grad_guard.experiments.default_experiments`
on scikit-learn's bundled digits (offline, CPU), one run after the other, each with a
:class:`~grad_guard.GradGuard` attached and its own TensorBoard run under ``--out``. It
then prints a results table and what each row teaches, writes ``results.md``,
``results.json`` and ``gradient_flow_comparison.png`` into ``--out``, and tells you the
``tensorboard --logdir`` command to open the runs.

How GradGuard is configured, and why:

* Runs without clipping get ``GradGuard(clipping=None)`` (the default GradGuard clips
  with ZClip, which would hide the explosion these rows exist to show) and a detection
  that only observes: ``on_nonfinite="warn"``. The default, ``"skip"``, would withhold
  NaN/Inf updates from the weights, so the row would no longer show what an unprotected
  training run does; with ``"warn"`` the divergence step in the table is the model's
  own. A warn-only detection also keeps its flags on the device between logging steps.
* Clipped runs use grad_guard's own clipper (the row's algorithm and arguments) inside
  GradGuard, with the default detection (``on_nonfinite="skip"``): the protected
  configuration, whose clipped fraction and skipped steps the table reports. Detection
  and the report see the raw gradient, before clipping, so a clipped row can still show
  spikes: the clipper kept them from reaching the weights.
* Each run's health report is built and written into its run folder
  (``grad_guard_report.md``/``.json``, heatmap and flow PNGs) but not printed; the
  diagnosis rules that fired go into the table. Anomaly warnings are not printed either:
  the table counts them.

Everything runs on one CPU thread: the models are tiny, a second thread does not make
them faster (under load it makes them much slower), and the numbers, which depend on the
thread count through the order of floating-point sums, then do not depend on the core
count.

Run it as ``grad-guard demo [--quick] [--out DIR] [--steps N] [--depth N] [--seed N]
[--no-progress]``, or from Python with :func:`main` (an invalid option returns 2 and
argparse's message, naming the option, goes to stderr):

Example:
    >>> main(["--steps", "0"])
    2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from grad_guard import plots
from grad_guard._validation import check_int
from grad_guard.callbacks.detection import GradientAnomalyDetection
from grad_guard.callbacks.guard import GradGuard
from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.core.clip import resolve_algorithm
from grad_guard.core.events import GradientAnomalyWarning
from grad_guard.experiments import (
    Experiment,
    ExperimentResult,
    default_experiments,
    run_experiment,
)
from grad_guard.history import GradientHistory
from grad_guard.models import weight_layer_names

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

DEFAULT_OUT = "grad_guard_demo"
DEFAULT_STEPS = 200
QUICK_STEPS = 60
DEFAULT_DEPTH = 20
LOGGED_POINTS = 30
"""About how many logged steps each run records (``log_every_n_steps = steps // 30``)."""
IMAGE_EVERY = 15
"""Logged steps between two TensorBoard heatmap / flow images (about two per run)."""

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
FIGURE_NAME = "gradient_flow_comparison.png"
REQUIRED = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}

PROG = "grad-guard demo"
DESCRIPTION = """\
Reproduce vanishing and exploding gradients, and their fixes, on scikit-learn's digits
(1797 8x8 images, bundled offline), with GradGuard watching every run.

Backpropagation multiplies the gradient by one Jacobian per layer on its way from the
loss to the input. When those factors are below 1 (sigmoid's derivative is at most
0.25, and PyTorch's default init keeps weights small) the gradient shrinks
geometrically: the first layers of a deep network get almost nothing and do not learn.
That is a VANISHING gradient. When the factors are above 1, or a large learning rate
with momentum lets the weights grow, the gradient grows instead: updates overshoot, the
loss jumps back to chance or becomes NaN/Inf. That is an EXPLODING gradient.

The remedies are Xavier/He initialisation (factors near 1 at the start), ReLU-family
activations (derivative 1 where active), gradient clipping (bound each update), and
BatchNorm with residual connections (an identity path for the gradient). The demo
trains one run per row below (default depth 20, SGD lr 0.1, batch 64):"""

EPILOG = """\
Outputs (under --out): one TensorBoard run per row (OUT/<row>/version_<n>/, with the
grad_guard scalars, gradient heatmap/flow images and the run's health report),
results.md and results.json (the table), and gradient_flow_comparison.png (per-layer
gradient norm at step 0 and during training, and the total norm per step, one line per
run). The table's "ratio@0" is the first/last weight-layer gradient-norm ratio at step 0
(<< 1: vanishing); vanishing/exploding/NaN/Inf count the steps GradGuard flagged;
"diagnosis" lists the rules of the end-of-fit report that fired.

Runs without clipping use GradGuard(clipping=None) with on_nonfinite="warn", so the
guard only observes and a divergence is the model's own (the default "skip" would keep
NaN updates out of the weights). Clipped rows use the row's grad_guard clipper inside
GradGuard with the default detection; detection sees the raw gradient, before clipping.

Needs the demo extra: pip install "grad-guard[demo]" (scikit-learn, matplotlib, rich)."""


# --------------------------------------------------------------------------- results


@dataclass
class DemoRow:
    """What one run of the demo measured (one row of the table).

    Attributes:
        name: the experiment's name (its TensorBoard run folder).
        description: model, optimizer and clipping in one line.
        lesson: what the row is meant to teach (from the experiment).
        expected: ``"vanishing"``, ``"exploding"`` or ``"healthy"``.
        clip_algorithm: the clipper's shortcut name, ``None`` without clipping.
        steps: steps asked for.
        steps_run: steps run (fewer when a diverged run was stopped).
        grad_ratio: first/last weight-layer gradient-norm ratio at step 0.
        accuracy: accuracy on the whole digits set after training.
        diverged_at: first step whose loss was NaN/Inf, ``None`` if none.
        counts: GradGuard's detection counts (``vanishing``, ``exploding``,
            ``nonfinite``, ``amp_overflow``, ``skipped_steps``).
        clipped_fraction: fraction of the steps the clipper clipped, ``None`` without one.
        rules: the end-of-fit report's diagnosis rules that fired.
        log_dir: the run's TensorBoard directory.
        wall_time_s: seconds spent training.
        step0_norms: gradient norm per weight layer at step 0, input first.
        median_norms: median over the logged steps of each weight layer's finite
            gradient norms, input first (``nan`` if it had none).
        total_norms: the raw total gradient norm of every step (``nan``/``inf`` where
            non-finite).
    """

    name: str
    description: str
    lesson: str
    expected: str
    clip_algorithm: str | None
    steps: int
    steps_run: int
    grad_ratio: float
    accuracy: float
    diverged_at: int | None
    counts: dict[str, int]
    clipped_fraction: float | None
    rules: list[str]
    log_dir: str
    wall_time_s: float
    step0_norms: list[float] = field(default_factory=list, repr=False)
    median_norms: list[float] = field(default_factory=list, repr=False)
    total_norms: list[float] = field(default_factory=list, repr=False)

    @property
    def problems(self) -> list[str]:
        """The gradient problems GradGuard flagged: detection counts or a report rule.

        Example:
            >>> row = DemoRow("r", "", "", "healthy", None, 5, 5, 1.0, 0.9, None,
            ...               {"vanishing": 3}, None, ["vanishing_depth"], "", 1.0)
            >>> row.problems
            ['vanishing']
        """
        found = []
        if self.counts.get("vanishing", 0) or any(r.startswith("vanishing") for r in self.rules):
            found.append("vanishing")
        if self.counts.get("exploding", 0) or "exploding" in self.rules:
            found.append("exploding")
        if self.counts.get("nonfinite", 0) or "nonfinite" in self.rules:
            found.append("non-finite")
        return found

    @property
    def flagged(self) -> bool:
        """Whether GradGuard flagged any gradient problem in this run."""
        return bool(self.problems)

    def cells(self) -> list[str]:
        """The row's table cells, in the order of :data:`COLUMNS`."""
        diverged = "-" if self.diverged_at is None else str(self.diverged_at)
        clipped = "-" if self.clipped_fraction is None else f"{self.clipped_fraction:.0%}"
        return [
            self.name,
            f"{self.grad_ratio:.1e}",
            f"{self.accuracy:.1%}",
            str(self.counts.get("vanishing", 0)),
            str(self.counts.get("exploding", 0)),
            str(self.counts.get("nonfinite", 0)),
            clipped,
            str(self.counts.get("skipped_steps", 0)),
            diverged,
            ", ".join(self.rules) or ("detection only" if self.flagged else "healthy"),
        ]

    def measured(self) -> str:
        """One sentence on what this run showed, with its numbers."""
        parts = [f"first/last gradient ratio {self.grad_ratio:.1e} at step 0"]
        if self.diverged_at is not None:
            parts.append(f"the loss became NaN/Inf at step {self.diverged_at}")
        parts.append(f"final accuracy {self.accuracy:.1%}")
        flagged = [
            f"{label} on {self.counts[key]} step(s)"
            for key, label in (
                ("vanishing", "vanishing"),
                ("exploding", "exploding spikes"),
                ("nonfinite", "NaN/Inf gradients"),
            )
            if self.counts.get(key, 0)
        ]
        if flagged:
            parts.append("GradGuard flagged " + ", ".join(flagged))
        if self.clipped_fraction is not None:
            parts.append(f"{self.clip_algorithm} clipped {self.clipped_fraction:.0%} of the steps")
        if self.rules:
            parts.append("report: " + ", ".join(self.rules))
        elif not self.flagged:
            parts.append("nothing flagged")
        return "; ".join(parts) + "."

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe values (non-finite floats become ``None``)."""
        data = asdict(self)
        data["problems"] = self.problems
        return _json_safe(data)


COLUMNS = (
    "run",
    "ratio@0",
    "accuracy",
    "vanishing",
    "exploding",
    "NaN/Inf",
    "clipped",
    "skipped",
    "diverged",
    "diagnosis",
)
"""Headers of the results table (``ratio@0``: first/last layer gradient ratio at step 0;
``diverged``: first step with a NaN/Inf loss)."""
CONSOLE_HEADERS = (
    "run",
    "ratio@0",
    "acc",
    "vanish",
    "explode",
    "NaN",
    "clipped",
    "skipped",
    "diverged",
    "diagnosis",
)
"""The same headers, shortened for the console table."""


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- running


def demo_experiments(depth: int = DEFAULT_DEPTH, steps: int = DEFAULT_STEPS) -> list[Experiment]:
    """The demo's matrix: :func:`~grad_guard.experiments.default_experiments` whose
    late-explosion and clipping runs have depth 12 (``depth`` when that is smaller).

    Example:
        >>> [exp.model_kwargs["depth"] for exp in demo_experiments(8, 10)][:4]
        [8, 8, 8, 8]
    """
    return default_experiments(depth, steps, clip_depth=min(12, depth))


# eight printed reports would bury the demo's own table: each is written to its run folder
# and the rules that fired go into the table
QUIET_REPORT: dict[str, bool] = {"report": True, "print_report": False}


def build_guard(exp: Experiment) -> GradGuard:
    """The GradGuard the demo attaches to ``exp`` (see the module docstring for why).

    Example:
        >>> plain, clipped = default_experiments()[0], default_experiments()[4]
        >>> build_guard(plain).clipping is None, build_guard(plain).detection.on_nonfinite
        (True, 'warn')
        >>> build_guard(clipped).clipping.algorithm
        NormClip(max_norm=1.0, norm_type=2.0, per_parameter=False)
    """
    # drawing the pictures costs more than training these small models: a few per run
    monitor = GradientNormMonitor(image_every_n_steps=IMAGE_EVERY)
    if exp.clip_algorithm is None:
        detection = GradientAnomalyDetection(on_nonfinite="warn")
        return GradGuard(monitor=monitor, detection=detection, clipping=None, **QUIET_REPORT)
    # the shortcut names the class; the experiment's clip_kwargs configure it
    algorithm = type(resolve_algorithm(exp.clip_algorithm))(**exp.clip_kwargs)  # type: ignore[arg-type]
    return GradGuard(monitor=monitor, clipping=algorithm, **QUIET_REPORT)


class _Progress:
    """One rich progress bar over every step of the matrix (a no-op when disabled)."""

    def __init__(self, total: int, enabled: bool, console: Any) -> None:
        self._progress: Any = None
        self._task: Any = None
        self.console = console
        if enabled and console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("steps"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._progress.add_task("training", total=total)

    def __enter__(self) -> _Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        elif self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)


class _StepProgress(Callback):
    """Advances the progress bar by one step after every training batch."""

    def __init__(self, advance: Callable[[int], None]) -> None:
        self.advance = advance

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.advance(1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _weight_layer_norms(
    result: ExperimentResult, history: GradientHistory | None
) -> tuple[list[float], list[float]]:
    """Step-0 and median-over-training gradient norms of the weight layers, input first."""
    names = weight_layer_names(result.model) if result.model is not None else []
    names = names or list(result.initial_grad_norms)
    step0 = [result.initial_grad_norms.get(name, math.nan) for name in names]
    medians = [math.nan] * len(names)
    if history is not None and len(history):
        matrix = history.matrix("grad_norm").filled(np.nan)
        index = {layer: i for i, layer in enumerate(history.layers)}
        for k, name in enumerate(names):
            # the monitor names layers from the LightningModule, which holds the model
            i = index.get(name, index.get(f"model.{name}"))
            if i is None:
                continue
            values = matrix[i]
            values = values[np.isfinite(values) & (values > 0)]
            if values.size:
                medians[k] = float(np.median(values))
    return step0, medians


def run_demo(
    out: str,
    steps: int = DEFAULT_STEPS,
    depth: int = DEFAULT_DEPTH,
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
    experiments: Sequence[Experiment] | None = None,
) -> list[DemoRow]:
    """Train the demo's matrix with GradGuard attached; one :class:`DemoRow` per run.

    Args:
        out: TensorBoard root; each run goes to ``out/<name>/version_<n>``.
        steps: optimizer steps per run (>= 1).
        depth: depth of the deep runs (>= 2; the late-explosion and clipping runs keep
            depth 12, or ``depth`` if smaller).
        seed: seed of weights and batch order.
        progress: show a progress bar (rich's over the whole matrix when ``console`` is a
            rich console, else Lightning's per run) and one line per finished run.
        console: a ``rich.console.Console`` to draw on, or ``None`` for plain output.
        experiments: run these instead of ``default_experiments(depth, steps)``.

    Raises:
        ValueError: if ``steps``, ``depth`` or ``seed`` is out of range.
    """
    check_int("steps", steps)
    check_int("depth", depth, 2)
    check_int("seed", seed, 0)
    if experiments is None:
        experiments = demo_experiments(depth, steps)
    log_every = max(1, steps // LOGGED_POINTS)
    rows: list[DemoRow] = []
    total = steps * len(experiments)
    rich_bar = progress and console is not None
    with _one_thread(), _Progress(total, rich_bar, console) as bar:
        for number, exp in enumerate(experiments, 1):
            bar.describe(f"[{number}/{len(experiments)}] {exp.name}")
            guard = build_guard(exp)
            callbacks = [guard]
            if rich_bar:
                callbacks.append(_StepProgress(bar.advance))
            with warnings.catch_warnings():
                # the table counts the anomalies; a warning per event would bury it
                warnings.simplefilter("ignore", GradientAnomalyWarning)
                result = run_experiment(
                    exp,
                    out,
                    callbacks,
                    steps=steps,
                    seed=seed,
                    progress_bar=progress and not rich_bar,
                    trainer_clipping=False,
                    log_every_n_steps=log_every,
                )
            if rich_bar and result.steps_run < steps:
                bar.advance(steps - result.steps_run)  # a diverged run stopped early
            row = _row(exp, result, guard, steps)
            rows.append(row)
            if progress:
                verdict = ", ".join(row.problems) if row.flagged else "nothing flagged"
                bar.print(
                    f"{exp.name:<24} accuracy {row.accuracy:6.1%}  {verdict}  "
                    f"({row.wall_time_s:.1f} s)"
                )
    return rows


def _row(exp: Experiment, result: ExperimentResult, guard: GradGuard, steps: int) -> DemoRow:
    history = getattr(guard.monitor, "history", None)
    step0, medians = _weight_layer_norms(result, history)
    report = guard.last_report
    counts = dict(guard.detection.counts) if guard.detection is not None else {}
    return DemoRow(
        name=exp.name,
        description=exp.describe(),
        lesson=exp.lesson,
        expected=exp.expected,
        clip_algorithm=exp.clip_algorithm,
        steps=steps,
        steps_run=result.steps_run,
        grad_ratio=result.grad_ratio,
        accuracy=result.train_accuracy,
        diverged_at=result.diverged_at,
        counts=counts,
        clipped_fraction=guard.clipping.clipped_fraction if guard.clipping else None,
        rules=report.rules() if report is not None else [],
        log_dir=result.log_dir,
        wall_time_s=result.wall_time_s,
        step0_norms=step0,
        median_norms=medians,
        total_norms=list(result.grad_norm_history),
    )


# --------------------------------------------------------------------------- output


def markdown_table(rows: Sequence[DemoRow]) -> str:
    """The results table as GitHub markdown.

    Example:
        >>> row = DemoRow("r", "", "", "healthy", None, 5, 5, 1.0, 0.9, None, {}, None, [],
        ...               "", 1.0)
        >>> print(markdown_table([row]).splitlines()[2])
        | r | 1.0e+00 | 90.0% | 0 | 0 | 0 | - | 0 | - | healthy |
    """
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plain_table(rows: Sequence[DemoRow]) -> str:
    """The results table as aligned plain text (used without rich)."""
    cells = [list(COLUMNS), *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def lessons_text(rows: Sequence[DemoRow], width: int = 100) -> str:
    """What each row teaches: the lesson, then what this run measured."""
    out = []
    for row in rows:
        out.append(f"{row.name}: {row.description}")
        for text in (row.lesson, "Here: " + row.measured()):
            out.append(textwrap.fill(text, width, initial_indent="  ", subsequent_indent="  "))
    return "\n".join(out)


def results_markdown(rows: Sequence[DemoRow], command: str, wall_time_s: float) -> str:
    """``results.md``: the table, how it was made, and what each row teaches."""
    steps = sorted({row.steps for row in rows})
    header = [
        "# grad-guard demo results",
        "",
        f"`{command}`: {len(rows)} runs of {', '.join(map(str, steps))} SGD steps "
        f"(batch 64, digits), {wall_time_s:.0f} s in all on CPU (one thread).",
        "",
        "`ratio@0`: first/last weight-layer gradient-norm ratio at step 0 (<< 1 is "
        "vanishing). `vanishing` / `exploding` / `NaN/Inf`: steps GradGuard's detection "
        "flagged (on the raw gradient, before clipping). `clipped`: fraction of steps the "
        "clipper clipped. `diagnosis`: rules of GradGuard's end-of-fit report that fired.",
        "",
    ]
    lessons = ["", "## What each row teaches", ""]
    for row in rows:
        lessons += [
            f"- **{row.name}** (`{row.description}`): {row.lesson} *Here:* {row.measured()}"
        ]
    return "\n".join(header) + "\n" + markdown_table(rows) + "\n".join(lessons) + "\n"


def comparison_figure(
    rows: Sequence[DemoRow], size: tuple[int, int] = (1500, 560), dpi: int = 100
) -> Figure:
    """One figure comparing the runs' gradient flow, one line per run (log scales).

    Panels: per weight layer, the gradient norm at step 0 and its median over training
    (input at the left; a vanishing run slopes down towards the input); and the total
    gradient norm of every step (an ``x`` marks the step a run's loss became NaN/Inf).
    Unclipped runs are solid lines, clipped runs dashed.

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
        style = "--" if row.clip_algorithm else "-"
        label = row.name + (f" (NaN at step {row.diverged_at})" if row.diverged_at else "")
        for axes, values in ((first, row.step0_norms), (second, row.median_norms)):
            data = np.asarray(values, dtype=float)
            x = np.arange(1, len(data) + 1)
            shown = np.where(np.isfinite(data) & (data > 0), data, np.nan)
            axes.plot(x, shown, style, color=color, marker="o", markersize=2.5, linewidth=1.3)
        totals = np.asarray(row.total_norms, dtype=float)
        finite = np.where(np.isfinite(totals) & (totals > 0), totals, np.nan)
        third.plot(np.arange(len(totals)), finite, style, color=color, linewidth=1.0, label=label)
        if row.diverged_at is not None:
            third.plot(
                [row.diverged_at],
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
        "grad-guard demo: gradient flow per run (solid: no clipping, dashed: clipped)",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    return figure


def write_outputs(
    rows: Sequence[DemoRow], out: str, command: str, wall_time_s: float
) -> dict[str, str]:
    """Write ``results.md``, ``results.json`` and the comparison PNG into ``out``."""
    os.makedirs(out, exist_ok=True)
    paths = {
        "markdown": os.path.join(out, RESULTS_MD),
        "json": os.path.join(out, RESULTS_JSON),
        "figure": os.path.join(out, FIGURE_NAME),
    }
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(results_markdown(rows, command, wall_time_s))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(
            {
                "format": "grad_guard_demo/1",
                "command": command,
                "wall_time_s": wall_time_s,
                "columns": list(COLUMNS),
                "runs": [row.to_dict() for row in rows],
            },
            f,
            indent=2,
        )
    plots.save_png(comparison_figure(rows), paths["figure"])
    return paths


def _print_table(rows: Sequence[DemoRow], console: Any, file: TextIO) -> None:
    if console is None:
        print(plain_table(rows), file=file)
        return
    from rich import box
    from rich.table import Table

    # one space between columns and short headers; below 120 columns the diagnosis moves
    # out of the table (it is in "what each row teaches" too) so the numbers fit in 80
    wide = console.width >= 120
    headers = CONSOLE_HEADERS if wide else CONSOLE_HEADERS[:-1]
    table = Table(
        title="grad-guard demo results",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=0,
        pad_edge=False,
        show_edge=False,
    )
    for i, name in enumerate(headers):
        text = i == 0 or name == "diagnosis"
        table.add_column(name, justify="left" if text else "right", no_wrap=name != "diagnosis")
    for row in rows:
        style = "red" if row.diverged_at is not None else ("yellow" if row.flagged else None)
        table.add_row(*row.cells()[: len(headers)], style=style)
    console.print(table)


# --------------------------------------------------------------------------- command


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}")
        return value

    return parse


def _experiment_list() -> str:
    lines = []
    for exp in default_experiments(DEFAULT_DEPTH, DEFAULT_STEPS):
        lines.append(f"  {exp.name}")
        lines.append(
            textwrap.fill(exp.lesson, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The ``grad-guard demo`` argument parser (its ``--help`` explains the experiment)."""
    result = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION + "\n\n" + _experiment_list(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    result.add_argument(
        "--quick",
        action="store_true",
        help=f"train {QUICK_STEPS} steps per run instead of {DEFAULT_STEPS} (for CI; the "
        "vanishing row shows, late explosions may not)",
    )
    result.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_OUT})",
    )
    result.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help=f"optimizer steps per run (default {DEFAULT_STEPS}, {QUICK_STEPS} with --quick)",
    )
    result.add_argument(
        "--depth",
        type=_int_at_least(2),
        default=DEFAULT_DEPTH,
        metavar="N",
        help=f"layers of the deep runs (default {DEFAULT_DEPTH}; the late-explosion and "
        "clipping runs use 12)",
    )
    result.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=0,
        metavar="N",
        help="seed of weights and batches (default 0)",
    )
    result.add_argument(
        "--no-progress", action="store_true", help="no progress bar and no per-run lines"
    )
    return result


def missing_dependencies() -> list[str]:
    """The pip names of the demo's required packages that are not installed.

    Example:
        >>> isinstance(missing_dependencies(), list)
        True
    """
    missing = []
    for module, package in REQUIRED.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def _console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a log file or a pipe: no need to wrap the table at 80
        console = Console(file=sys.stdout, width=160)
    return console


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``grad-guard demo`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Returns ``0`` on success, ``2`` for invalid arguments (argparse names the option) and
    ``1`` when scikit-learn or matplotlib is missing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors: an exit code, not an exception
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)

    missing = missing_dependencies()
    if missing:
        print(
            f"{PROG}: needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install the demo extra: "
            'pip install "grad-guard[demo]"',
            file=sys.stderr,
        )
        return 1

    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    out = os.path.abspath(args.out)
    console = _console()
    command = " ".join(["grad-guard demo", *argv])
    _say(
        console,
        f"Training {len(demo_experiments(args.depth, steps))} runs of {steps} steps "
        f"(depth {args.depth}, seed {args.seed}) into {out}",
    )
    start = time.perf_counter()
    rows = run_demo(
        out,
        steps=steps,
        depth=args.depth,
        seed=args.seed,
        progress=not args.no_progress,
        console=console,
    )
    wall_time = time.perf_counter() - start
    paths = write_outputs(rows, out, command, wall_time)

    _say(console, "")
    _print_table(rows, console, sys.stdout)
    _say(console, "")
    _say(console, "What each row teaches")
    _say(console, lessons_text(rows))
    _say(console, "")
    _say(console, f"Trained {len(rows)} runs in {wall_time:.1f} s.")
    _say(console, f"Wrote {paths['markdown']}, {paths['json']} and {paths['figure']}")
    _say(console, f"Open the runs in TensorBoard:  tensorboard --logdir {out}")
    return 0


def _say(console: Any, text: str) -> None:
    if console is None:
        print(text, flush=True)
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
