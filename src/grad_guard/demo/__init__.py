"""``grad-guard demo`` and the experiments behind it.

Modules, each about one thing:

* ``settings``: defaults and file names; ``experiment``: :class:`Experiment`, one
  configuration; ``experiments``: the demo's rows (:func:`default_experiments`);
* ``data``: the offline digits (and a synthetic stand-in); ``probe``: step-0 gradient
  ratio and evaluation; ``runner``: :func:`run_experiment` (one Lightning run);
  ``tracking``: the runner's loss / gradient-norm recorder;
* ``seedrun``: one row for one seed with ``GradGuard``; ``report_hook``: its health
  report; ``matrix``: :func:`run_demo`, every row over several seeds;
  ``rows``: :class:`DemoRow` / :class:`SeedRun` and the outcome of a run;
* ``tables``, ``figures``, ``results``: text, picture and ``results.json``;
  ``docs``: the README table and ``docs/demo_results.md`` generated from the committed
  results; ``command``: :func:`main`, the ``grad-guard demo`` command.

Names are imported lazily, so ``grad-guard demo --help`` does not import torch.

Example:
    >>> from grad_guard import demo
    >>> demo.QUICK_STEPS < demo.DEFAULT_STEPS
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from grad_guard.demo.settings import (
    DEFAULT_OUT,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    FIGURE_NAME,
    QUICK_SEEDS,
    QUICK_STEPS,
    RESULTS_JSON,
    RESULTS_MD,
)

_LAZY: dict[str, str] = {
    "main": "grad_guard.demo.command",
    "add_options": "grad_guard.demo.command",
    "parser": "grad_guard.demo.command",
    "missing_dependencies": "grad_guard.demo.command",
    "Experiment": "grad_guard.demo.experiment",
    "OUTCOMES": "grad_guard.demo.experiment",
    "default_experiments": "grad_guard.demo.experiments",
    "run_demo": "grad_guard.demo.matrix",
    "DemoRow": "grad_guard.demo.rows",
    "SeedRun": "grad_guard.demo.rows",
    "classify": "grad_guard.demo.rows",
    "build_guard": "grad_guard.demo.seedrun",
    "train_seed": "grad_guard.demo.seedrun",
    "COLUMNS": "grad_guard.demo.tables",
    "markdown_table": "grad_guard.demo.tables",
    "plain_table": "grad_guard.demo.tables",
    "comparison_figure": "grad_guard.demo.figures",
    "DemoResults": "grad_guard.demo.results",
    "load_results": "grad_guard.demo.results",
    "write_outputs": "grad_guard.demo.results",
    "without_wall_clock": "grad_guard.demo.results",
    "run_experiment": "grad_guard.demo.runner",
    "ExperimentResult": "grad_guard.demo.result",
}

__all__ = [
    "COLUMNS",
    "DEFAULT_OUT",
    "DEFAULT_SEEDS",
    "DEFAULT_STEPS",
    "FIGURE_NAME",
    "OUTCOMES",
    "QUICK_SEEDS",
    "QUICK_STEPS",
    "RESULTS_JSON",
    "RESULTS_MD",
    "DemoResults",
    "DemoRow",
    "Experiment",
    "ExperimentResult",
    "SeedRun",
    "add_options",
    "build_guard",
    "classify",
    "comparison_figure",
    "default_experiments",
    "load_results",
    "main",
    "markdown_table",
    "missing_dependencies",
    "parser",
    "plain_table",
    "run_demo",
    "run_experiment",
    "train_seed",
    "without_wall_clock",
    "write_outputs",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'grad_guard.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
