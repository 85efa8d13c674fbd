"""Old import path of the demo's experiments, kept working: see :mod:`grad_guard.demo`.

:class:`Experiment` lives in :mod:`grad_guard.demo.experiment`, the demo's rows
(:func:`default_experiments`) in :mod:`grad_guard.demo.experiments`, the runner
(:func:`run_experiment`) in :mod:`grad_guard.demo.runner`.

Example:
    >>> from grad_guard.experiments import run_experiment
    >>> from grad_guard.demo import runner
    >>> run_experiment is runner.run_experiment
    True
"""

from __future__ import annotations

from grad_guard.demo.experiment import (
    CLIP_ALGORITHMS,
    DATASETS,
    EXPECTATIONS,
    MODELS,
    OPTIMIZERS,
    OUTCOMES,
    TRAINER_CLIP_ALGORITHMS,
    Experiment,
)
from grad_guard.demo.experiments import default_experiments
from grad_guard.demo.probe import GradientProbe, evaluate, probe_gradients
from grad_guard.demo.result import ExperimentResult
from grad_guard.demo.runner import load_dataset, run_experiment, run_experiments

__all__ = [
    "CLIP_ALGORITHMS",
    "DATASETS",
    "EXPECTATIONS",
    "MODELS",
    "OPTIMIZERS",
    "OUTCOMES",
    "TRAINER_CLIP_ALGORITHMS",
    "Experiment",
    "ExperimentResult",
    "GradientProbe",
    "default_experiments",
    "evaluate",
    "load_dataset",
    "probe_gradients",
    "run_experiment",
    "run_experiments",
]
