"""The step engine: everything grad_guard does in one optimizer step, in one place.

Every front end (the Lightning callbacks, ``GradientGuard`` for plain and Fabric loops)
calls :meth:`StepEngine.step` between the backward pass and ``optimizer.step()``, and
:meth:`StepEngine.after_step` after it. A step is:

1. **statistics**: one ``torch._foreach_norm`` pass per (granularity, p) the parts ask
   for, all on the raw gradients (divided by the GradScaler's scale when they are still
   scaled);
2. **rules**: the anomaly detector updates its device statistics and flags;
3. **clipping**: the algorithm computes its coefficient; it is multiplied in (after the
   read of step 4 when there is one, and then not at all when it is exactly 1.0), or
   folded into a fused optimizer's kernel (``grad_scale``) together with the skip flag
   (``found_inf``), see :mod:`grad_guard.core.fused`;
4. **one host read**, only when an action must be decided now or on a logging step:
   flags, counters and (logging) every reported figure in one copy;
5. **policy**: counts, events, rate-limited warnings, actions; a skip is applied
   before anything that can raise;
6. **metrics** of a logging step, as tag -> float.

Steps 1-5 up to the decision run under ``torch.inference_mode()`` when every parameter is
a plain tensor (``no_grad`` for ``DTensor``, which does not support it): the small tensor
ops of the rules cost less there (no autograd bookkeeping), and nothing they make is
modified in place outside it. What touches the user's objects (dropping gradients,
multiplying in a clip factor read on the host, rollbacks) runs after it.

The engine never imports Lightning; front ends only translate its outcome.
"""

from __future__ import annotations

from typing import Any

from grad_guard.core.aftermath import Aftermath, nonfinite_parameter
from grad_guard.core.clip.base import scale_grads_
from grad_guard.core.packet import HostPacket
from grad_guard.core.parts import ClippingPart, MonitorPart
from grad_guard.core.policy import AnomalyPolicy
from grad_guard.core.step import StepOutcome, StepRequest, apply_actions
from grad_guard.core.step_report import read_step, report_step, report_update
from grad_guard.core.track import (
    DEFAULT_PART,
    OptimizerTrack,
    build_track,
    count_drop,
    decide_read,
    detection_packet,
    pass_key,
    update_rules,
)

__all__ = ["StepEngine", "StepOutcome", "StepRequest"]


class StepEngine:
    """Runs one optimizer step of statistics, rules, clipping and reporting.

    Args:
        monitor: what to report on logging steps, or ``None``.
        detection: the anomaly policy (actions, counts, events), or ``None``.
        clipping: the clipping part, or ``None``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grad_guard.core.clip import NormClip
        >>> from grad_guard.core.layers import group_parameters
        >>> model = nn.Linear(3, 1)
        >>> engine = StepEngine(MonitorPart(), None, ClippingPart(NormClip(1.0)))
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> request = StepRequest(
        ...     key=0, label="", layers=lambda g: group_parameters(model, g), signature=0,
        ...     params=list(model.parameters()), step=0, log_step=0, logging=True)
        >>> outcome = engine.step(request)
        >>> sorted(outcome.metrics[0][1])[:2], round(outcome.logged["total"], 3)
        (['grad_guard/clip/clipped_fraction', 'grad_guard/clip/post_norm'], 4.0)
    """

    def __init__(
        self,
        monitor: MonitorPart | None = None,
        detection: AnomalyPolicy | None = None,
        clipping: ClippingPart | None = None,
    ) -> None:
        self.monitor = monitor
        self.detection = detection
        self.clipping = clipping
        self._tracks: dict[Any, OptimizerTrack] = {}
        self._saved_detectors: dict[Any, dict[str, Any]] = {}
        self.aftermath = Aftermath()  # rollbacks, LR cool-down, forward-origin tracing
        self.passes = 0  # statistics passes made (for tests)

    # ------------------------------------------------------------------ the step

    def step(self, request: StepRequest) -> StepOutcome:
        """Run one optimizer step; see the module docstring for the order.

        Raises:
            GradientAnomalyError: when an anomaly whose action is ``"raise"`` fired
                (after the clip; the caller's ``optimizer.step()`` is not reached).
        """
        outcome = StepOutcome()
        policy = self.detection
        recovery = policy.recovery if policy is not None else None
        if recovery is not None and request.batch_index in recovery.bad_batches:
            # it caused a rollback before: drop it again, without asking the rules
            for param in request.params:
                param.grad = None
            assert policy is not None
            policy.counts["skipped_steps"] += 1
            outcome.skipped = True
            return outcome
        self.aftermath.finish_trace(self.detection)
        track = self._track(request)
        fold = track.fold is not None and request.fold_allowed
        needs_now = policy is not None and policy.needs_host_decision(fold)
        with track.device_mode():
            values, deferred = self._on_device(track, request, outcome, fold, needs_now)
        if values is None:
            self.aftermath.cool_down(self.detection, request)
            return outcome
        if deferred is not None and not outcome.decision.drops and values["coefficient"][0] != 1.0:
            with track.device_mode():  # no autograd record, even of a create_graph grad
                scale_grads_(*deferred)  # (gradients, factor); before "raise" can raise
        self.aftermath.start_trace(request, outcome)
        apply_actions(request, outcome, fold)
        self.aftermath.recover(self, request, outcome)
        if request.logging and outcome.error is None:
            report_step(self, track, request, outcome.stats, outcome, values)
        if not outcome.skipped:  # a dropped step uses no learning rate
            self.aftermath.cool_down(self.detection, request)
        return outcome

    def _on_device(
        self,
        track: OptimizerTrack,
        request: StepRequest,
        outcome: StepOutcome,
        fold: bool,
        needs_now: bool,
    ) -> tuple[dict[str, list[float]] | None, Any]:
        """Statistics, rules, clip, and (when due) the host read and the decision.

        Returns the host values (``None``: no read this step) and ``(gradients, clip
        factor)`` left for the caller to multiply in, or ``None``: a step read on the
        host anyway has its factor read too, and 1.0 is not multiplied in.
        """
        stats = {
            key: computer(grad_scale=request.grad_scale)
            for key, computer in track.computers.items()
        }
        self.passes += len(stats)
        primary = stats[pass_key(self.monitor or self.detection or self.clipping or DEFAULT_PART)]
        outcome.stats = primary
        policy = self.detection
        defer = not fold and (needs_now or request.logging)
        drop_now = clipper = grads = None
        judged = False  # the rules ran: their findings stand even if clipping fails
        try:
            if policy is not None:
                drop_now = update_rules(track, policy, request, stats[pass_key(policy)])
            judged = True
            if self.clipping is not None:
                clipper = self.clipping.for_key(request.key, request.first)
                clipper.process_group = request.process_group
                clip_stats = stats[pass_key(self.clipping)]
                outcome.clip = clipper.clip_stats(clip_stats, apply=not (fold or defer))
                grads = clip_stats.grads
            if fold and track.fold is not None:
                coefficient = outcome.clip.coefficient if outcome.clip is not None else None
                track.fold.set(coefficient, drop_now)
                outcome.folded = True
        except Exception as err:  # still join the read below: other ranks wait in it
            outcome.error = err
            outcome.clip = None
            if judged and fold and track.fold is not None:
                track.fold.set(None, drop_now)  # unclipped, but a bad step is still dropped
                outcome.folded = True
        if judged:
            count_drop(track, drop_now)
        if not (needs_now or request.logging):
            outcome.skipped = None if fold and drop_now is not None else False
            return None, None
        factor = outcome.clip.coefficient if defer and outcome.clip is not None else None
        try:
            values = read_step(self, track, request, primary, outcome.clip, clipper, factor)
            if track.detector is not None and policy is not None and judged:
                computer = track.computers[pass_key(policy)]
                findings, outcome.decision = decide_read(
                    track,
                    policy,
                    values["detection"],
                    request.label,
                    nonfinite_parameter=lambda: nonfinite_parameter(computer, request.reduce),
                )
                outcome.healthy = not (findings.any_now or findings.amp_now)
        except BaseException:
            if factor is not None:  # the read failed: the gradients are clipped all the same
                scale_grads_(grads, factor)  # type: ignore[arg-type]
            raise
        return values, (None if factor is None else (grads, factor))

    def after_step(self, key: Any) -> None:
        """Call after ``optimizer.step()``: measures the update of a logging step."""
        recovery = self.detection.recovery if self.detection is not None else None
        if recovery is not None:
            recovery.warm_up()
        track = self._tracks.get(key)
        if track is None or track.snapshot is None:
            return
        snapshot, track.snapshot = track.snapshot, None
        with track.device_mode():  # the snapshot was made there
            track.pending_update = snapshot.measure()

    def flush(self, key: Any, label: str) -> StepOutcome:
        """Read what is pending for optimizer ``key``: lazy flags and update ratios.

        Local to this process (no collective); call at the end of training and before
        the state is saved.
        """
        outcome = StepOutcome()
        track = self._tracks.get(key)
        if track is None:
            return outcome
        self.after_step(key)
        packet = HostPacket()
        pending_flags = track.detector is not None and bool(track.detector.steps)
        pending_flags = pending_flags and track.dropped is not None
        with track.device_mode():
            if pending_flags:
                packet.add("detection", detection_packet(track))
            if track.pending_update is not None:
                packet.add("update", track.pending_update.norms)
            values = packet.read()
            if pending_flags and self.detection is not None:
                _, outcome.decision = decide_read(
                    track, self.detection, values["detection"], label, act=False
                )
        report_update(self, track, label, values, outcome)
        return outcome

    # ------------------------------------------------------------------ internals

    def _track(self, request: StepRequest) -> OptimizerTrack:
        track = self._tracks.get(request.key)
        if track is None or track.signature != request.signature:
            saved = self._saved_detectors.pop(request.key, None)
            track = build_track(self, request, track, saved)
            self._tracks[request.key] = track
        return track

    def own_state(self) -> dict[str, Any]:
        """grad_guard's statistics that a rollback restores with the weights."""
        state: dict[str, Any] = {"detectors": self.detector_states()}
        if self.clipping is not None:
            state["clipping"] = self.clipping.state_dict()
        return state

    def load_own_state(self, state: dict[str, Any]) -> None:
        self.load_detector_states(state.get("detectors", {}))
        if self.clipping is not None and "clipping" in state:
            self.clipping.load_state_dict(state["clipping"])

    # ------------------------------------------------------------------ state

    def detector_states(self) -> dict[Any, dict[str, Any]]:
        """Each optimizer's detector statistics (spike windows, EMAs, streaks)."""
        states = dict(self._saved_detectors)
        for key, track in self._tracks.items():
            if track.detector is not None:
                states[key] = track.detector.state_dict()
        return states

    def load_detector_states(self, states: dict[Any, dict[str, Any]]) -> None:
        """Restore :meth:`detector_states`; detectors not built yet load theirs when built."""
        self._saved_detectors = dict(states)
        for key, track in self._tracks.items():
            if track.detector is not None and key in self._saved_detectors:
                track.detector.load_state_dict(self._saved_detectors.pop(key))

    def reset(self) -> None:
        """Forget every optimizer's passes and device state (a new fit)."""
        for track in self._tracks.values():
            if track.fold is not None:
                track.fold.remove()
        self._tracks = {}
