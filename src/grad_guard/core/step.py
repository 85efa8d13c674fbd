"""What a front end tells the step engine, and what the engine tells it back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from grad_guard.core.clip import ClipResult
from grad_guard.core.events import AnomalyEvent, GradientAnomalyError
from grad_guard.core.layers import Granularity, Layer
from grad_guard.core.policy import Decision
from grad_guard.core.stats import GradientStats


@dataclass
class StepRequest:
    """What a front end tells the engine about one optimizer step.

    Attributes:
        key: identifies the optimizer (its index in a Trainer, say).
        label: ``""`` for a single optimizer, else ``"optimizer_<i>"`` (tag level).
        layers: builds the layers for a granularity (called when they change).
        signature: changes when the optimizer's trainable parameters change.
        params: every parameter the optimizer steps (a skip sets their grads to None).
        step: the step number of events (``global_step``).
        log_step: the step number of logged scalars.
        logging: whether this is a logging step.
        optimizer: the optimizer, when it may fold clipping and skipping (fused).
        fold_allowed: ``False`` when something after grad_guard must see clipped grads.
        first: whether this is the first optimizer (it uses the algorithm given).
        amp_overflow: scalar bool tensor, the GradScaler will skip this step itself.
        grad_scale: the GradScaler scale the gradients are still multiplied by.
        loss: the step's training loss (scalar tensor), for the loss rule.
        reduce: element-wise MAX over ranks, for the detection flags (``None``: one process).
        process_group: FSDP1 flat-shard group for the statistics.
        module: the model, for algorithms that need layer types (AGC).
        batch_index: the batch's index within its epoch (a batch that caused a
            rollback is skipped whenever it comes again).
        targets: builds what a rollback restores (model, optimizers, schedulers).
    """

    key: Any
    label: str
    layers: Callable[[Granularity], list[Layer]]
    signature: Any
    params: list[Tensor]
    step: int
    log_step: int
    logging: bool
    optimizer: Any = None
    fold_allowed: bool = True
    first: bool = True
    amp_overflow: Tensor | None = None
    grad_scale: Tensor | None = None
    loss: Tensor | None = None
    reduce: Callable[[Tensor], Tensor] | None = None
    process_group: Any = None
    module: Any = None
    batch_index: int | None = None
    targets: Callable[[], Any] | None = None


@dataclass
class StepOutcome:
    """What one step found and did; front ends translate it.

    Attributes:
        skipped: the gradients were not applied (``None``: not known on the host this
            step, a fused optimizer dropped or applied them in its kernel).
        should_stop: a ``"stop"`` action fired, or too many steps in a row were dropped.
        rollback: the event asking for a rollback to the last healthy snapshot.
        decision: events recorded and warnings due (after the actions were applied).
        metrics: ``[(log_step, {tag: value})]`` to write, oldest first.
        stats: the statistics pass of the raw gradients (the monitor's).
        clip: the clipping result, ``None`` without clipping.
        folded: clipping/skipping were folded into a fused optimizer's kernel.
        logged: host values of a logging step ``{"names", "norms", "total", "params",
            "has_grad"}`` for histories, ``None`` otherwise.
        healthy: the step was read on the host and no rule fired (``None``: not read).
        restored_step: the step of the snapshot a rollback restored.
        error: what failed inside grad_guard this step (the gradients were left as
            they were), or ``None``.
    """

    skipped: bool | None = False
    should_stop: bool = False
    rollback: AnomalyEvent | None = None
    decision: Decision = field(default_factory=Decision)
    metrics: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    stats: GradientStats | None = None
    clip: ClipResult | None = None
    folded: bool = False
    logged: dict[str, Any] | None = None
    healthy: bool | None = None
    restored_step: int | None = None
    error: Exception | None = None


def apply_actions(request: StepRequest, outcome: StepOutcome, fold: bool) -> None:
    """Carry out the decision of a read: drop the step (``None`` gradients, or nothing to
    do when a fused kernel drops it), ask for a stop or a rollback, raise.

    Raises:
        GradientAnomalyError: when an anomaly whose action is ``"raise"`` fired.
    """
    actions = outcome.decision.actions
    if outcome.decision.drops and not fold:
        for param in request.params:
            param.grad = None
    outcome.skipped = outcome.decision.drops
    outcome.rollback = actions.get("rollback")
    outcome.should_stop = outcome.decision.stop_reason is not None
    if "raise" in actions:
        raise GradientAnomalyError(actions["raise"])
