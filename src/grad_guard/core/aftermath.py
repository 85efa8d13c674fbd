"""What a step leaves behind for later: rollbacks, the LR cool-down, forward-origin traces.

The engine decides; :class:`Aftermath` carries out what outlives the decision: restoring
the last healthy snapshot (and taking new ones on healthy steps), cooling the learning
rate after a rollback, and hooking the forward pass after a non-finite step to name the
module where the NaN is born.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from grad_guard.core.events import AnomalyEvent
from grad_guard.core.forward_origin import ForwardOriginTracer
from grad_guard.core.policy import AnomalyPolicy, Decision
from grad_guard.core.stats import GradientStatsComputer, local_tensor
from grad_guard.core.step import StepOutcome, StepRequest


class Aftermath:
    """Rollbacks, cool-downs and forward-origin tracing for one engine."""

    def __init__(self) -> None:
        self._tracing: tuple[ForwardOriginTracer, AnomalyEvent] | None = None

    def recover(self, engine: Any, request: StepRequest, outcome: StepOutcome) -> None:
        """Roll back on request; otherwise let a healthy step refresh the snapshot."""
        policy = engine.detection
        recovery = policy.recovery if policy is not None else None
        if recovery is None or policy is None or request.targets is None:
            return
        if outcome.rollback is None and outcome.healthy is None:
            return
        targets = dataclasses.replace(
            request.targets(), extra_state=engine.own_state, load_extra_state=engine.load_own_state
        )
        if outcome.rollback is None:
            recovery.observe(request.step, bool(outcome.healthy), targets)
            return
        # a weight that is already non-finite is not the batch's fault: do not skip it later
        origin = outcome.rollback.forward_origin or ""
        blamed = None if origin.startswith("parameter ") else request.batch_index
        restored = recovery.roll_back(targets, blamed)
        if restored is None:
            outcome.decision.warnings.append(
                f"grad_guard: step {request.step} asked for a rollback, but no healthy snapshot "
                f"exists yet (one is taken after {recovery.config.min_healthy_steps} healthy "
                "steps); the step was skipped instead."
            )
        else:
            policy.counts["rollbacks"] += 1
            outcome.restored_step = restored
            outcome.rollback = policy.annotate(
                outcome.decision, outcome.rollback, restored_step=restored
            )
        if recovery.exhausted:
            outcome.should_stop = True
            message = (
                f"grad_guard: {recovery.rollbacks} rollbacks (max_rollbacks="
                f"{recovery.config.max_rollbacks}); stopping training cleanly."
            )
            outcome.decision.stop_reason = message
            outcome.decision.warnings.append(message)

    def start_trace(self, request: StepRequest, outcome: StepOutcome) -> None:
        """After a non-finite step: hook the next forward to find where the NaN is born.

        No standing cost: the hooks exist only for the one forward after a non-finite
        step (a fault that lasts a single batch is missed; one that persists is named).
        """
        if request.module is None or self._tracing is not None:
            return
        event = next(
            (
                e
                for e in outcome.decision.events
                # only a NaN of this very step: one read lazily at a logging step is old
                if e.kind == "nonfinite" and e.forward_origin is None and e.step == request.step
            ),
            None,
        )
        if event is not None:
            tracer = ForwardOriginTracer(request.module)
            tracer.arm()
            self._tracing = (tracer, event)

    def finish_trace(self, policy: AnomalyPolicy | None) -> None:
        """Name the first module whose output went non-finite in the traced forward."""
        if self._tracing is None or policy is None:
            return
        (tracer, event), self._tracing = self._tracing, None
        tracer.disarm()
        origin = tracer.origin
        if origin is not None:
            policy.annotate(Decision(), event, forward_origin=origin)

    def cool_down(self, policy: AnomalyPolicy | None, request: StepRequest) -> None:
        recovery = policy.recovery if policy is not None else None
        if recovery is not None and request.optimizer is not None:
            recovery.cool_down([request.optimizer])


def nonfinite_parameter(computer: GradientStatsComputer, reduce: Any = None) -> str | None:
    """The first parameter (forward order) whose values are themselves NaN/Inf, if any.

    Called only on a non-finite step: one more pass over the weights and one host read.
    Sharded parameters (``DTensor``) are checked shard by shard and the flags combined
    over ranks with ``reduce`` (element-wise MAX), so every rank names the same one.
    """
    names = [n for layer in computer.layers for n in layer.param_names]
    params = [local_tensor(p.detach()) for layer in computer.layers for p in layer.params]
    if not params:
        return None
    with torch.no_grad():
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).float()
        if reduce is not None:
            bad = reduce(bad)
        flags = bad.tolist()
    for name, flag in zip(names, flags):
        if flag > 0.5:
            return name
    return None
