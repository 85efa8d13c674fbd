"""What grad_guard does under each Lightning strategy, decided once at setup.

- DDP (``ddp``, ``ddp_spawn``, ``ddp_fork``): gradients are all-reduced before
  ``on_before_optimizer_step``, so every rank computes the same norms from its own copy,
  with no collective of its own.
- FSDP2 and tensor/sequence parallel (``ModelParallelStrategy``): gradients are
  ``DTensor``; :mod:`grad_guard.core.stats` sums the local ``|g|^p`` of all layers and
  all-reduces them once per sharded mesh dimension. Replicated placements are counted once.
- FSDP1 (``FSDPStrategy``): gradients are plain tensors, each rank's slice of a flat
  parameter; the same packed sums are all-reduced over the FSDP process group
  (:func:`flat_shard_group`). Under ``use_orig_params=False`` only whole FSDP units are
  visible, so one norm per unit is reported (said once). AGC is refused: its unit-wise
  norms need whole rows, which flat slices cut.
- DeepSpeed: refused (:func:`check_strategy` says why and what to use instead).

Strategies are recognised by class name, so this module needs neither DeepSpeed nor a
GPU to make its decision.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class UnsupportedStrategyError(RuntimeError):
    """Raised at setup when grad_guard cannot give correct numbers under a strategy."""


_DEEPSPEED_MESSAGE = (
    "grad_guard does not support {name}: DeepSpeed partitions the gradients across ranks "
    "(ZeRO) and calls `on_before_optimizer_step` once per micro-batch instead of once per "
    "optimizer step, so per-layer norms, anomaly decisions and clipping would act on partial, "
    "not yet accumulated gradient shards and be silently wrong. Use "
    "`strategy='ddp'` (model fits on one device), FSDP2 via "
    "`ModelParallelStrategy` with `fully_shard` in `configure_model`, or `FSDPStrategy`; "
    "with DeepSpeed, use its own `gradient_clipping` config setting instead."
)

_AGC_FSDP1_MESSAGE = (
    "grad_guard: AGC (unit-wise clipping) cannot run under FSDPStrategy (FSDP1): each rank "
    "holds a flat slice of the parameters that cuts through rows, so the unit-wise norms "
    "AGC needs are not available. Use FSDP2 (`ModelParallelStrategy` with `fully_shard`), "
    "where each row stays on one rank, or a norm-based algorithm (NormClip, ZClip, AutoClip)."
)

_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def strategy_class_names(strategy: Any) -> frozenset[str]:
    """Names of ``strategy``'s class and its bases (subclasses are recognised too).

    Example:
        >>> class DeepSpeedStrategy: ...
        >>> class MyDeepSpeed(DeepSpeedStrategy): ...
        >>> "DeepSpeedStrategy" in strategy_class_names(MyDeepSpeed())
        True
    """
    return frozenset(cls.__name__ for cls in type(strategy).__mro__)


def is_deepspeed(strategy: Any) -> bool:
    """True for Lightning's ``DeepSpeedStrategy`` (and subclasses)."""
    return "DeepSpeedStrategy" in strategy_class_names(strategy)


def is_fsdp1(strategy: Any) -> bool:
    """True for Lightning's ``FSDPStrategy`` (FSDP1, flat parameters) and subclasses."""
    return "FSDPStrategy" in strategy_class_names(strategy)


def _sharding_strategy_name(strategy: Any) -> str:
    sharding = getattr(strategy, "sharding_strategy", None)
    return str(getattr(sharding, "name", sharding) or "FULL_SHARD")


def _uses_orig_params(strategy: Any) -> bool:
    kwargs = getattr(strategy, "kwargs", None) or {}
    return bool(kwargs.get("use_orig_params", True))


def _uses_unitwise_clipping(callback: Any) -> bool:
    # AdaptiveGradientClipping holds `algorithm`; GradGuard holds one as `clipping`
    for holder in (callback, getattr(callback, "clipping", None)):
        algorithm = getattr(holder, "algorithm", None)
        if algorithm is not None and "AGC" in strategy_class_names(algorithm):
            return True
    return False


def check_strategy(strategy: Any, callbacks: Iterable[Any] = ()) -> None:
    """Refuse strategies where grad_guard would be wrong; say once what is approximated.

    Called by every grad_guard callback at ``setup``, before any step runs.

    Args:
        strategy: the Trainer's strategy (``trainer.strategy``).
        callbacks: the Trainer's callbacks, to find algorithms a strategy cannot serve.

    Raises:
        UnsupportedStrategyError: under DeepSpeed (partitioned gradients, hook per
            micro-batch), or AGC under FSDP1 (flat slices cut the rows AGC normalises by).

    Example:
        >>> class DeepSpeedStrategy:  # a stand-in: the real one needs deepspeed installed
        ...     pass
        >>> check_strategy(DeepSpeedStrategy())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        grad_guard.callbacks.strategy.UnsupportedStrategyError: grad_guard does not support DeepSpeedStrategy: ...
    """
    if is_deepspeed(strategy):
        raise UnsupportedStrategyError(_DEEPSPEED_MESSAGE.format(name=type(strategy).__name__))
    if not is_fsdp1(strategy):
        return
    if any(_uses_unitwise_clipping(callback) for callback in callbacks):
        raise UnsupportedStrategyError(_AGC_FSDP1_MESSAGE)
    if not _uses_orig_params(strategy) and strategy not in _warned:
        _warned.add(strategy)
        rank_zero_warn(
            "grad_guard: FSDPStrategy(use_orig_params=False) gives each FSDP unit one flat "
            "gradient, so grad_guard reports one norm per FSDP unit (named after the wrapped "
            "module; '(root)' holds the parameters no inner unit wraps). The total norm, "
            "detection and norm clipping stay exact. Pass `use_orig_params=True` (Lightning's "
            "default) for per-layer norms.",
            category=UserWarning,
        )


def flat_shard_group(trainer: Any) -> Any:
    """The process group over which FSDP1 gradient slices must be summed, else ``None``.

    ``None`` for every strategy but FSDP1, and for FSDP1's ``NO_SHARD`` (complete
    gradients on every rank: summing would count each one world-size times). Under
    ``HYBRID_SHARD`` this is the group that shards (gradients are already reduced across
    the replicas).
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or not is_fsdp1(strategy):
        return None
    if _sharding_strategy_name(strategy) == "NO_SHARD":
        return None
    group = getattr(getattr(strategy, "model", None), "process_group", None)
    if group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
    return group
