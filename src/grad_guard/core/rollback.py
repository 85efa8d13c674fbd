"""Roll back to the last healthy state: snapshots, restore, bad batches, LR cool-down.

:class:`Recovery` is the host half of the ``"rollback"`` action, shared by every front
end. Every ``snapshot_every_n_steps`` steps, once the run has been healthy for a while,
it copies the model (parameters and buffers), the optimizers' state, the LR schedulers'
state and grad_guard's own statistics to host memory (pinned where CUDA is available,
copied asynchronously from the device). When a rule asks for a rollback it restores
that copy in place, remembers the batch that caused it (so it is skipped from then on,
also after a resume), optionally cools the learning rate down for a few steps, and after
``max_rollbacks`` asks the run to stop.

What is not restored: the data loader position (the run goes on with the next batch),
RNG states, and anything outside the model, optimizers and schedulers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grad_guard._validation import check_float, check_int


@dataclass(frozen=True)
class RollbackConfig:
    """How the ``"rollback"`` action snapshots and recovers.

    Args:
        snapshot_every_n_steps: steps between snapshots of the healthy state.
        min_healthy_steps: healthy steps in a row needed before a snapshot is taken (at
            most ``snapshot_every_n_steps``).
        max_rollbacks: stop the run after this many rollbacks.
        lr_factor: multiply the learning rate by this for ``cooldown_steps`` steps after
            a rollback (``1.0``: no cool-down).
        cooldown_steps: how many steps the cool-down lasts.

    Raises:
        ValueError: if a value is out of range; the message names it.

    Example:
        >>> RollbackConfig(lr_factor=0)
        Traceback (most recent call last):
        ...
        ValueError: `lr_factor` must be a number > 0 and <= 1, got 0
    """

    snapshot_every_n_steps: int = 100
    min_healthy_steps: int = 10
    max_rollbacks: int = 5
    lr_factor: float = 1.0
    cooldown_steps: int = 0

    def __post_init__(self) -> None:
        check_int("snapshot_every_n_steps", self.snapshot_every_n_steps)
        check_int("min_healthy_steps", self.min_healthy_steps, minimum=0)
        check_int("max_rollbacks", self.max_rollbacks)
        object.__setattr__(self, "lr_factor", check_float("lr_factor", self.lr_factor, 0.0, 1.0))
        check_int("cooldown_steps", self.cooldown_steps, minimum=0)


@dataclass
class RecoveryTargets:
    """What a rollback restores: the front end's model, optimizers and schedulers."""

    modules: Sequence[nn.Module]
    optimizers: Sequence[Any]
    schedulers: Sequence[Any] = ()
    extra_state: Callable[[], dict[str, Any]] = dict  # grad_guard's own statistics
    load_extra_state: Callable[[dict[str, Any]], None] = lambda state: None


@dataclass
class Snapshot:
    """One copy of the healthy state, in host memory."""

    step: int
    modules: list[dict[str, Tensor]]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    extra: dict[str, Any]
    nbytes: int = 0


@dataclass
class Recovery:
    """Snapshots of the last healthy state and the rollbacks made from them.

    Args:
        config: the :class:`RollbackConfig`.

    Attributes:
        bad_batches: batch indices (within the epoch) that caused a rollback; a front end
            skips them from then on.
        rollbacks: rollbacks made so far.
    """

    config: RollbackConfig = field(default_factory=RollbackConfig)
    bad_batches: set[int] = field(default_factory=set)
    rollbacks: int = 0
    snapshot: Snapshot | None = None
    _healthy_run: int = 0
    _cooldown_left: int = 0
    _cooled: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    def observe(self, step: int, healthy: bool, targets: RecoveryTargets) -> bool:
        """Count a step read on the host; take a snapshot when one is due. Returns whether."""
        self._healthy_run = self._healthy_run + 1 if healthy else 0
        every = self.config.snapshot_every_n_steps
        due = step % every == 0 or self.snapshot is None
        needed = min(self.config.min_healthy_steps, every)
        if not (healthy and due and self._healthy_run >= needed):
            return False
        self.snapshot = take_snapshot(step, targets)
        return True

    def roll_back(self, targets: RecoveryTargets, batch_index: int | None) -> int | None:
        """Restore the snapshot in place; return its step (``None``: there is none yet)."""
        if batch_index is not None:
            self.bad_batches.add(int(batch_index))
        if self.snapshot is None:
            return None
        restore_snapshot(self.snapshot, targets)
        self.rollbacks += 1
        self._healthy_run = 0
        self._cooldown_left = self.config.cooldown_steps if self.config.lr_factor < 1 else 0
        return self.snapshot.step

    @property
    def exhausted(self) -> bool:
        """Whether ``max_rollbacks`` was reached."""
        return self.rollbacks >= self.config.max_rollbacks

    def cool_down(self, optimizers: Iterable[Any]) -> None:
        """Before a step: scale the learning rate down while a cool-down lasts."""
        if self._cooldown_left <= 0:
            return
        self._cooldown_left -= 1
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                self._cooled.append((group, group["lr"]))
                group["lr"] = group["lr"] * self.config.lr_factor

    def warm_up(self) -> None:
        """After a step: put back the learning rates :meth:`cool_down` changed."""
        for group, lr in self._cooled:
            group["lr"] = lr
        self._cooled = []

    def state_dict(self) -> dict[str, Any]:
        return {"bad_batches": sorted(self.bad_batches), "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_batches = {int(i) for i in state.get("bad_batches", [])}
        self.rollbacks = int(state.get("rollbacks", 0))


def take_snapshot(step: int, targets: RecoveryTargets) -> Snapshot:
    """Copy the targets' state to host memory (pinned, asynchronous, where CUDA is there)."""
    nbytes = [0]

    def to_host(value: Any) -> Any:
        if isinstance(value, Tensor):
            nbytes[0] += value.numel() * value.element_size()
            return _host_copy(value)
        if isinstance(value, dict):
            return {k: to_host(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(to_host(v) for v in value)
        return copy.deepcopy(value)

    with torch.no_grad():
        snapshot = Snapshot(
            step=step,
            modules=[to_host(dict(m.state_dict())) for m in targets.modules],
            optimizers=[to_host(o.state_dict()) for o in targets.optimizers],
            schedulers=[to_host(s.state_dict()) for s in targets.schedulers],
            extra=to_host(targets.extra_state()),
        )
    snapshot.nbytes = nbytes[0]
    return snapshot


def restore_snapshot(snapshot: Snapshot, targets: RecoveryTargets) -> None:
    """Load ``snapshot`` into the targets in place (parameters keep their identity)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the asynchronous copies of the snapshot are complete
    with torch.no_grad():
        for module, state in zip(targets.modules, snapshot.modules):
            module.load_state_dict(state)
        for optimizer, state in zip(targets.optimizers, snapshot.optimizers):
            optimizer.load_state_dict(copy.deepcopy(state))
        for scheduler, state in zip(targets.schedulers, snapshot.schedulers):
            scheduler.load_state_dict(copy.deepcopy(state))
    targets.load_extra_state(copy.deepcopy(snapshot.extra))


def _host_copy(tensor: Tensor) -> Tensor:
    tensor = tensor.detach()
    if tensor.device.type == "cpu":
        return tensor.clone()
    pinned = torch.cuda.is_available() and tensor.device.type == "cuda"
    host = torch.empty_like(tensor, device="cpu", pin_memory=pinned)
    host.copy_(tensor, non_blocking=pinned)
    return host
