"""Train one row of the demo for one seed with a ``GradGuard`` attached.

How GradGuard is configured, and why:

* Runs without clipping get ``GradGuard(clipping=None)`` (the default GradGuard clips
  with ZClip, which would hide the explosion these rows exist to show) and a detection
  that only observes: ``on_nonfinite="warn"``. The default, ``"skip"``, would withhold
  NaN/Inf updates from the weights, so the row would no longer show what an unprotected
  training run does; with ``"warn"`` the divergence step in the table is the model's own.
* Clipped runs use grad_guard's own clipper (the row's algorithm and arguments) inside
  GradGuard, with the default detection (``on_nonfinite="skip"``): the protected
  configuration. Detection and the report see the raw gradient, before clipping, so a
  clipped row can still show spikes: the clipper kept them from reaching the weights.
* Each run's health report (:mod:`grad_guard.demo.report_hook`) is written into its run
  folder but not printed; the diagnosis rules that fired go into the table. Only the
  first seed of a row (its *showcase* run) draws pictures (TensorBoard images, report
  PNGs): drawing costs more than training these small models, and the other seeds are
  there for the numbers.

Every run is single-threaded and seeded, so its numbers do not depend on how many runs
train side by side, nor on the machine's core count.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from typing import Any

import numpy as np
import torch

from grad_guard.callbacks.detection import GradientAnomalyDetection
from grad_guard.callbacks.guard import GradGuard
from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.core.clip import resolve_algorithm
from grad_guard.core.events import GradientAnomalyWarning
from grad_guard.demo.experiment import Experiment
from grad_guard.demo.report_hook import SeedReport
from grad_guard.demo.result import ExperimentResult
from grad_guard.demo.rows import SeedRun
from grad_guard.demo.runner import run_experiment
from grad_guard.demo.settings import IMAGE_EVERY, LOGGED_POINTS
from grad_guard.models import weight_layer_names


def build_guard(exp: Experiment, pictures: bool = True) -> GradGuard:
    """The GradGuard the demo attaches to ``exp`` (see the module docstring for why).

    Args:
        exp: the row.
        pictures: draw the monitor's TensorBoard images (the showcase run of a row).

    Example:
        >>> from grad_guard.demo.experiments import default_experiments
        >>> plain, clipped = default_experiments()[0], default_experiments()[4]
        >>> build_guard(plain).clipping is None, build_guard(plain).detection.on_nonfinite
        (True, 'warn')
        >>> build_guard(clipped).clipping.algorithm
        NormClip(max_norm=1.0, norm_type=2.0, per_parameter=False)
    """
    monitor = GradientNormMonitor(image_every_n_steps=IMAGE_EVERY if pictures else None)
    quiet = {"report": False}  # SeedReport builds it (grad_guard.demo.report_hook)
    if exp.clip_algorithm is None:
        detection = GradientAnomalyDetection(on_nonfinite="warn")
        return GradGuard(monitor=monitor, detection=detection, clipping=None, **quiet)
    # the shortcut names the class; the experiment's clip_kwargs configure it
    algorithm = type(resolve_algorithm(exp.clip_algorithm))(**exp.clip_kwargs)  # type: ignore[arg-type]
    return GradGuard(monitor=monitor, clipping=algorithm, **quiet)


def train_seed(exp: Experiment, out: str, seed: int, steps: int, showcase: bool) -> SeedRun:
    """Train ``exp`` for ``steps`` steps with ``seed``; the run lands in ``out/<name>/seed_<seed>``.

    A previous run in that folder is deleted first, so TensorBoard shows one run per
    seed and a second demo gives the same ``results.json``. Torch runs on one thread
    here (and is set back afterwards).

    Args:
        exp: the row.
        out: the demo's output folder.
        seed: seed of weights and batch order.
        steps: optimizer steps.
        showcase: draw pictures and keep the per-step traces (the row's first seed).
    """
    start = time.process_time()
    version = f"seed_{seed}"
    folder = os.path.join(out, exp.name, version)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    guard = build_guard(exp, pictures=showcase)
    report = SeedReport(guard, pictures=showcase)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # the table counts the anomalies; a warning per event would bury it
            warnings.simplefilter("ignore", GradientAnomalyWarning)
            result = run_experiment(
                exp,
                out,
                [guard, report],
                steps=steps,
                seed=seed,
                progress_bar=False,
                trainer_clipping=False,
                log_every_n_steps=max(1, steps // LOGGED_POINTS),
                version=version,
            )
    finally:
        torch.set_num_threads(threads)
    run = _seed_run(exp, out, seed, steps, result, guard, report.report, showcase)
    run.cpu_time_s = time.process_time() - start
    return run


def _seed_run(
    exp: Experiment,
    out: str,
    seed: int,
    steps: int,
    result: ExperimentResult,
    guard: GradGuard,
    report: Any,
    showcase: bool,
) -> SeedRun:
    counts = dict(guard.detection.counts) if guard.detection is not None else {}
    run = SeedRun(
        name=exp.name,
        seed=seed,
        steps=steps,
        steps_run=result.steps_run,
        grad_ratio=result.grad_ratio,
        accuracy=result.train_accuracy,
        final_loss=result.final_loss,
        diverged_at=result.diverged_at,
        counts={key: int(value) for key, value in sorted(counts.items())},
        clipped_fraction=guard.clipping.clipped_fraction if guard.clipping else None,
        rules=sorted(report.rules()) if report is not None else [],
        log_dir=os.path.relpath(result.log_dir, out),
        wall_time_s=result.wall_time_s,
        first_grad_norm=result.grad_norm_history[0] if result.grad_norm_history else math.nan,
        max_grad_norm=result.max_grad_norm,
    )
    if showcase:
        history = getattr(guard.monitor, "history", None)
        run.step0_norms, run.median_norms = _weight_layer_norms(result, history)
        run.total_norms = list(result.grad_norm_history)
    return run


def _weight_layer_norms(result: ExperimentResult, history: Any) -> tuple[list[float], list[float]]:
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
