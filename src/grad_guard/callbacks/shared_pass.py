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
    # key -> (signature of the optimizer's trainable parameters, computer)
    computers: dict[tuple, tuple[tuple, GradientStatsComputer]] = field(default_factory=dict)
    current: dict[tuple, tuple[int, StepContext]] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)  # id(optimizer) -> skipped step
    retired_passes: int = 0


_ENTRIES: weakref.WeakKeyDictionary[Any, _TrainerEntry] = weakref.WeakKeyDictionary()


def reset(trainer: Any) -> None:
    """Forget layers and cached passes of ``trainer`` (at the start of each fit)."""
    _ENTRIES.pop(trainer, None)


def _signature(optimizer: Optimizer) -> tuple:
    """What changes when parameters are unfrozen or a param group is added."""
    sizes = tuple(len(group["params"]) for group in optimizer.param_groups)
    trainable = sum(p.requires_grad for group in optimizer.param_groups for p in group["params"])
    return sizes, trainable


def step_context(
    trainer: Any,
    pl_module: Any,
    optimizer: Optimizer,
    granularity: Granularity = "module",
    norm_type: float = 2.0,
) -> StepContext:
    """The :class:`StepContext` of this optimizer step, computing the pass if needed.

    Callbacks asking with the same ``granularity`` and ``norm_type`` in the same step
    share one pass. The layers are rebuilt when the optimizer's trainable parameters
    change (unfreezing, ``add_param_group``).
    """
    entry = _ENTRIES.setdefault(trainer, _TrainerEntry())
    key = (id(optimizer), granularity, float(norm_type))
    step = int(trainer.global_step)
    cached = entry.current.get(key)
    if cached is not None and cached[0] == step:
        return cached[1]
    signature = _signature(optimizer)
    known = entry.computers.get(key)
    if known is None or known[0] != signature:
        if known is not None:
            entry.retired_passes += known[1].passes
        layers = group_parameters(
            pl_module, granularity, parameters=optimizer_parameters(optimizer)
        )
        computer = GradientStatsComputer(layers, norm_type, process_group=flat_shard_group(trainer))
        entry.computers[key] = (signature, computer)
    else:
        computer = known[1]
    context = StepContext(stats=computer(), computer=computer)
    context.skipped = entry.skipped.get(id(optimizer)) == step
    entry.current[key] = (step, context)
    return context


def mark_skipped(trainer: Any, optimizer: Optimizer) -> None:
    """Record that this step's gradients were dropped, for every callback of the step."""
    entry = _ENTRIES.setdefault(trainer, _TrainerEntry())
    step = int(trainer.global_step)
    entry.skipped[id(optimizer)] = step
    for (optimizer_id, *_), (cached_step, context) in entry.current.items():
        if optimizer_id == id(optimizer) and cached_step == step:
            context.skipped = True


def _grad_guard_callbacks(trainer: Any) -> list[Any]:
    found: list[Any] = []
    pending = list(getattr(trainer, "callbacks", []) or [])
    while pending:
        callback = pending.pop(0)
        parts = getattr(callback, "parts", None)
        if isinstance(parts, list):
            pending.extend(parts)
        elif hasattr(callback, "granularity") and hasattr(callback, "norm_type"):
            found.append(callback)
    return found


def raw_passes_first(trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
    """Make every pass this step's grad_guard callbacks will ask for, before a clipper runs.

    A callback measuring with another ``granularity`` or ``norm_type`` than the clipper
    (say, a per-parameter monitor) then still sees the raw gradients, not clipped ones.
    """
    keys = {(cb.granularity, float(cb.norm_type)) for cb in _grad_guard_callbacks(trainer)}
    for granularity, norm_type in keys:
        step_context(trainer, pl_module, optimizer, granularity, norm_type)


def passes(trainer: Any) -> int:
    """How many statistics passes grad_guard made for ``trainer`` (for tests)."""
    entry = _ENTRIES.get(trainer)
    if entry is None:
        return 0
    return entry.retired_passes + sum(c.passes for _, c in entry.computers.values())
