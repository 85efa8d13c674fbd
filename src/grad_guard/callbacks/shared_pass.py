"""One statistics pass per optimizer step, shared by every grad_guard callback.

When a user adds, say, ``GradientNormMonitor`` and ``AdaptiveGradientClipping`` to the
same Trainer, the first one to run in a step computes the :class:`GradientStats` of that
optimizer's gradients and the others reuse it, so the gradients are read once. Because
the first pass happens before any clipper touches the gradients, every callback sees the
raw (unscaled, unclipped) statistics of the step.

The cache is keyed by ``(optimizer, global_step)``: Lightning advances ``global_step``
once per optimizer step, also in manual optimization with several optimizers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer

from grad_guard.callbacks.strategy import flat_shard_group
from grad_guard.core.layers import Granularity, group_parameters
from grad_guard.core.stats import GradientStats, GradientStatsComputer


def optimizer_parameters(optimizer: Optimizer) -> list[Any]:
    """The parameters an optimizer steps, in ``param_groups`` order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_label(trainer: Any, optimizer: Optimizer) -> str:
    """``""`` when the Trainer has one optimizer, else ``"optimizer_<index>"``."""
    optimizers = list(getattr(trainer, "optimizers", []) or [])
    if len(optimizers) <= 1:
        return ""
    for index, candidate in enumerate(optimizers):
        if candidate is optimizer or getattr(candidate, "optimizer", None) is optimizer:
            return f"optimizer_{index}"
    return f"optimizer_{id(optimizer):x}"


def training_step(trainer: Any) -> int:
    """The step number loggers use: batches that stepped an optimizer so far.

    Same value Lightning's own ``self.log`` and ``LearningRateMonitor`` use; it counts
    batches, so with two optimizers in manual optimization both log at the same step.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


@dataclass
class StepContext:
    """What grad_guard knows about the current optimizer step, shared by callbacks.

    Attributes:
        stats: statistics of the raw gradients (before any clipping).
        computer: the object that made them (layers, parameter norms).
        skipped: set by detection when it dropped this step's gradients.
        post_clip_total_norm: set by a clipper once it has clipped.
        clip_threshold: the threshold a clipper applied (a tensor).
        extras: free room for other per-step facts.
    """

    stats: GradientStats
    computer: GradientStatsComputer
    skipped: bool = False
    post_clip_total_norm: Any = None
    clip_threshold: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class _TrainerEntry:
    computers: dict[tuple, GradientStatsComputer] = field(default_factory=dict)
    current: dict[tuple, tuple[int, StepContext]] = field(default_factory=dict)


_ENTRIES: weakref.WeakKeyDictionary[Any, _TrainerEntry] = weakref.WeakKeyDictionary()


def reset(trainer: Any) -> None:
    """Forget layers and cached passes of ``trainer`` (at the start of each fit)."""
    _ENTRIES.pop(trainer, None)


def step_context(
    trainer: Any,
    pl_module: Any,
    optimizer: Optimizer,
    granularity: Granularity = "module",
    norm_type: float = 2.0,
) -> StepContext:
    """The :class:`StepContext` of this optimizer step, computing the pass if needed.

    Callbacks asking with the same ``granularity`` and ``norm_type`` in the same step
    share one pass.
    """
    entry = _ENTRIES.setdefault(trainer, _TrainerEntry())
    key = (id(optimizer), granularity, float(norm_type))
    computer = entry.computers.get(key)
    if computer is None:
        layers = group_parameters(
            pl_module, granularity, parameters=optimizer_parameters(optimizer)
        )
        computer = entry.computers[key] = GradientStatsComputer(
            layers, norm_type, process_group=flat_shard_group(trainer)
        )
    step = int(trainer.global_step)
    cached = entry.current.get(key)
    if cached is not None and cached[0] == step:
        return cached[1]
    context = StepContext(stats=computer(), computer=computer)
    entry.current[key] = (step, context)
    return context


def passes(trainer: Any) -> int:
    """How many statistics passes grad_guard made for ``trainer`` (for tests)."""
    entry = _ENTRIES.get(trainer)
    return 0 if entry is None else sum(c.passes for c in entry.computers.values())
