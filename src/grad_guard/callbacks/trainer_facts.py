"""What grad_guard reads off a Lightning Trainer: step numbers, optimizers, scaler, ranks.

Facts, not decisions: the session asks these to fill a
:class:`~grad_guard.core.step.StepRequest`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def training_step(trainer: Any) -> int:
    """The step number loggers use: batches that stepped an optimizer so far.

    Same value Lightning's own ``self.log`` and ``LearningRateMonitor`` use; it counts
    batches, so with two optimizers in manual optimization both log at the same step.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def optimizer_index(trainer: Any, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not found)."""
    inner = getattr(optimizer, "_optimizer", optimizer)
    for index, candidate in enumerate(getattr(trainer, "optimizers", []) or []):
        if candidate is optimizer or candidate is inner:
            return index
        if getattr(candidate, "optimizer", None) is inner:
            return index
    return 0


def optimizer_label_of(trainer: Any, index: int) -> str:
    """``""`` when the Trainer has one optimizer, else ``"optimizer_<index>"``."""
    return "" if len(getattr(trainer, "optimizers", []) or []) <= 1 else f"optimizer_{index}"


def max_reducer(trainer: Any) -> Any:
    """Element-wise MAX over all ranks, or ``None`` for a single process."""
    if int(getattr(trainer, "world_size", 1) or 1) <= 1:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _all_reduce_max
    return _StrategyMax(trainer.strategy)


def mean_over_ranks(trainer: Any, loss: Tensor | None) -> Tensor | None:
    """The loss of the global batch: every rank judges the same value (one tiny all-reduce)."""
    world_size = int(getattr(trainer, "world_size", 1) or 1)
    if loss is None or world_size <= 1:
        return loss
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return trainer.strategy.reduce(loss.clone(), reduce_op="mean")
    total = loss.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)  # NaN on any rank stays NaN
    return total / world_size


def _all_reduce_max(tensor: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


class _StrategyMax:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def __call__(self, tensor: Tensor) -> Tensor:
        return self.strategy.reduce(tensor, reduce_op="max")


def scaler_of(trainer: Any) -> Any:
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscaled(scaler: Any, optimizer: Optimizer) -> bool:
    state = scaler._per_optimizer_states.get(id(optimizer))
    return bool(state and state.get("found_inf_per_device"))


def amp_overflow(scaler: Any, optimizer: Optimizer) -> Tensor | None:
    """Scalar bool tensor: will the GradScaler skip this step for Inf/NaN? (no host sync)

    Lightning calls ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step``
    for non-fused optimizers, which records per device whether it found Inf/NaN. For a
    fused optimizer the gradients are still scaled here and the engine treats any
    overflow as the scaler's to skip. ``None`` when no enabled scaler is in play.
    """
    if scaler is None:
        return None
    state = scaler._per_optimizer_states.get(id(optimizer))
    found = state.get("found_inf_per_device") if state else None
    if not found:
        return None
    values = list(found.values())
    device = values[0].device
    return torch.stack([f.to(device).reshape(()) for f in values]).sum() > 0


def someone_needs_clipped_grads(trainer: Any, pl_module: Any) -> bool:
    """Whether anything after grad_guard reads the gradients before the optimizer steps."""
    if getattr(trainer, "gradient_clip_val", None):
        return True
    for name in ("on_before_optimizer_step", "configure_gradient_clipping"):
        if _overridden(type(pl_module), name, "LightningModule"):
            return True
    for callback in getattr(trainer, "callbacks", []):
        if getattr(callback, "is_grad_guard", False):
            continue
        if _overridden(type(callback), "on_before_optimizer_step", "Callback"):
            return True
    return False


def _overridden(cls: type, name: str, base: str) -> bool:
    """Whether ``cls`` (not Lightning itself) overrides the ``base`` hook ``name``."""
    method = getattr(cls, name, None)
    module = getattr(method, "__module__", "") or ""
    return method is not None and not module.startswith(("lightning.", "pytorch_lightning."))
