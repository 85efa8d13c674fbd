"""The step engine: everything grad_guard does in one optimizer step, in one place.

Every front end (the Lightning callbacks, ``GradientGuard`` for plain and Fabric loops)
calls :meth:`StepEngine.step` between the backward pass and ``optimizer.step()``, and
:meth:`StepEngine.after_step` after it. A step is:

1. **statistics**: one ``torch._foreach_norm`` pass per (granularity, p) the parts ask
   for, all on the raw gradients (divided by the GradScaler's scale when they are still
   scaled);
2. **rules**: the anomaly detector updates its device statistics and flags;
3. **clipping**: the algorithm computes its coefficient; it is multiplied in, or folded
   into a fused optimizer's kernel (``grad_scale``) together with the skip flag
   (``found_inf``), see :mod:`grad_guard.core.fused`;
4. **one host read**, only when an action must be decided now or on a logging step:
   flags, counters and (logging) every reported figure in one copy;
5. **policy**: counts, events, rate-limited warnings, actions; a skip is applied
   before anything that can raise;
6. **metrics** of a logging step, as tag -> float.

The engine never imports Lightning; front ends only translate its outcome.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.clip import ClipResult
from grad_guard.core.detect import GradientAnomalyDetector, judged_for_vanishing
from grad_guard.core.events import KINDS, AnomalyEvent, GradientAnomalyError
from grad_guard.core.fused import FusedFold, is_fused
from grad_guard.core.layers import Granularity, Layer
from grad_guard.core.metrics import step_metrics, update_ratio_metrics
from grad_guard.core.packet import HostPacket
from grad_guard.core.parts import ClippingPart, MonitorPart
from grad_guard.core.policy import AnomalyPolicy, Decision
from grad_guard.core.stats import GradientStats, GradientStatsComputer
from grad_guard.core.update_ratio import UpdateNorms, UpdateSnapshot

PassKey = tuple[Granularity, float]


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


class _Track:
    """What the engine keeps for one optimizer."""

    def __init__(self, signature: Any) -> None:
        self.signature = signature
        self.computers: dict[PassKey, GradientStatsComputer] = {}
        self.detector: GradientAnomalyDetector | None = None
        self.drop_mask: Tensor | None = None
        self.dropped: Tensor | None = None  # dropped steps since the last read (device)
        self.streak: Tensor | None = None  # dropped steps in a row (device)
        self.fold: FusedFold | None = None
        self.snapshot: UpdateSnapshot | None = None
        self.pending_update: UpdateNorms | None = None
        self.clip_since: tuple[int, Tensor] | None = None  # clipper (steps, clipped) at last log


class StepEngine:
    """Runs one optimizer step of statistics, rules, clipping and reporting.

    Args:
        monitor: what to report on logging steps, or ``None``.
        detection: the anomaly policy (actions, counts, events), or ``None``.
        clipping: the clipping part, or ``None``.

    Example:
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
        self._tracks: dict[Any, _Track] = {}
        self._saved_detectors: dict[Any, dict[str, Any]] = {}
        self.passes = 0  # statistics passes made (for tests)

    # ------------------------------------------------------------------ the step

    def step(self, request: StepRequest) -> StepOutcome:
        """Run one optimizer step; see the module docstring for the order.

        Raises:
            GradientAnomalyError: when an anomaly whose action is ``"raise"`` fired
                (after the step's gradients were dropped).
        """
        track = self._track(request)
        outcome = StepOutcome()
        with torch.no_grad():
            stats = {
                key: computer(grad_scale=request.grad_scale)
                for key, computer in track.computers.items()
            }
        self.passes += len(stats)
        primary = stats[self._primary_key()]
        outcome.stats = primary
        fold = track.fold is not None and request.fold_allowed

        drop_now = self._detect(track, request, stats)
        clipper = None
        if self.clipping is not None:
            clipper = self.clipping.for_key(request.key, request.first)
            clip_stats = stats[self._key(self.clipping)]
            clipper.process_group = request.process_group
            outcome.clip = clipper.clip_stats(clip_stats, apply=not fold)
        if fold and track.fold is not None:
            coefficient = outcome.clip.coefficient if outcome.clip is not None else None
            track.fold.set(coefficient, drop_now)
            outcome.folded = True
        if drop_now is not None and track.dropped is not None and track.streak is not None:
            track.dropped += drop_now
            track.streak = torch.where(drop_now, track.streak + 1, 0)

        needs_now = self.detection is not None and self.detection.needs_host_decision(fold)
        if not (needs_now or request.logging):
            outcome.skipped = None if fold and drop_now is not None else False
            return outcome
        values = self._read(track, request, primary, outcome.clip, clipper)
        if track.detector is not None and self.detection is not None:
            findings = track.detector.decode(values["detection"])
            track.detector.clear_pending()
            dropped, streak = (round(v) for v in values["drops"])
            if track.dropped is not None:
                track.dropped.zero_()
            outcome.decision = self.detection.decide(findings, request.label, dropped, streak)
        self._act(track, request, outcome, fold)
        if request.logging:
            self._report(track, request, primary, outcome, values)
        return outcome

    def after_step(self, key: Any) -> None:
        """Call after ``optimizer.step()``: measures the update of a logging step."""
        track = self._tracks.get(key)
        if track is None or track.snapshot is None:
            return
        snapshot, track.snapshot = track.snapshot, None
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
        if pending_flags:
            packet.add("detection", track.detector.pack())  # type: ignore[union-attr]
            packet.add("drops", torch.stack([track.dropped, track.streak]))  # type: ignore[list-item]
        if track.pending_update is not None:
            packet.add("update", track.pending_update.norms)
        values = packet.read()
        if pending_flags and self.detection is not None and track.detector is not None:
            findings = track.detector.decode(values["detection"])
            track.detector.clear_pending()
            dropped, streak = (round(v) for v in values["drops"])
            track.dropped.zero_()  # type: ignore[union-attr]
            outcome.decision = self.detection.decide(findings, label, dropped, streak, act=False)
        self._report_update(track, label, values, outcome)
        return outcome

    # ------------------------------------------------------------------ internals

    def _key(self, part: Any) -> PassKey:
        return (part.granularity, float(part.norm_type))

    def _primary_key(self) -> PassKey:
        """The pass that is logged and judged: the monitor's, else detection's, else the clipper's."""
        part = self.monitor or self.detection or self.clipping or _DEFAULT
        return self._key(part)

    def _track(self, request: StepRequest) -> _Track:
        track = self._tracks.get(request.key)
        if track is not None and track.signature == request.signature:
            return track
        old, track = track, _Track(request.signature)
        parts = [p for p in (self.monitor, self.detection, self.clipping) if p is not None]
        for part in parts or [_DEFAULT]:
            key = self._key(part)
            if key not in track.computers:
                track.computers[key] = GradientStatsComputer(
                    request.layers(key[0]), key[1], process_group=request.process_group
                )
        if self.detection is not None:
            computer = track.computers[self._key(self.detection)]
            track.detector = GradientAnomalyDetector(
                computer.layer_names, self.detection.config, judged_for_vanishing(computer.layers)
            )
            saved = self._saved_detectors.pop(request.key, None)
            if saved is None and old is not None and old.detector is not None:
                saved = old.detector.state_dict()
            if saved:
                track.detector.load_state_dict(saved)
        if self.clipping is not None and request.module is not None:
            self.clipping.for_key(request.key, request.first).bind(request.module)
        if request.optimizer is not None and is_fused(request.optimizer):
            track.fold = old.fold if old is not None and old.fold is not None else FusedFold(
                request.optimizer
            )
        self._tracks[request.key] = track
        return track

    def _detect(
        self, track: _Track, request: StepRequest, stats: dict[PassKey, GradientStats]
    ) -> Tensor | None:
        """Update the rules; return the device flag "drop this step" (``None``: no rule drops)."""
        detector, policy = track.detector, self.detection
        if detector is None or policy is None:
            return None
        det_stats = stats[self._key(self.detection)]
        amp = request.amp_overflow
        if amp is None and request.grad_scale is not None:
            amp = det_stats.any_nonfinite  # still scaled: an overflow is the scaler's to skip
        detector.update(det_stats, request.step, amp, request.loss)
        if detector.now is None:
            return None
        if track.drop_mask is None:
            device = detector.now.device
            track.drop_mask = torch.tensor(policy.dropping, dtype=torch.bool, device=device)
            track.dropped = torch.zeros((), dtype=torch.long, device=device)
            track.streak = torch.zeros((), dtype=torch.long, device=device)
        if not any(policy.dropping):
            return None
        return (detector.now & track.drop_mask).any()

    def _read(
        self,
        track: _Track,
        request: StepRequest,
        stats: GradientStats,
        clip: ClipResult | None,
        clipper: Any,
    ) -> dict[str, list[float]]:
        packet = HostPacket()
        reduce = {}
        if track.detector is not None:
            packet.add("detection", track.detector.pack())
            if track.dropped is not None and track.streak is not None:
                packet.add("drops", torch.stack([track.dropped, track.streak]))
            else:
                packet.add("drops", torch.zeros(2))
            if request.reduce is not None:
                reduce = {"detection": request.reduce, "drops": request.reduce}
        if request.logging:
            packet.add("norms", stats.layer_norms)
            packet.add("total", stats.total_norm)
            if self.monitor is not None and (
                self.monitor.log_param_norms or self.monitor.log_update_ratio
            ):
                computer = track.computers[self._key(self.monitor)]
                param_norms = computer.parameter_norms()
                packet.add("params", param_norms)
                if self.monitor.log_update_ratio:
                    track.snapshot = UpdateSnapshot(computer, request.log_step, param_norms)
            if clip is not None and clipper is not None:
                last_steps, last_clipped = track.clip_since or (0, clipper.clipped_steps * 0)
                since = clipper.clipped_steps - last_clipped.to(clipper.clipped_steps.device)
                device = clip.pre_norm.device
                packet.add(
                    "clip",
                    torch.stack(
                        [clip.pre_norm, clip.post_norm, clip.threshold.to(device), since.to(device)]
                    ).float(),
                )
                packet.add("clip_steps", torch.tensor([float(clipper.steps - last_steps)]))
                track.clip_since = (clipper.steps, clipper.clipped_steps)
            if track.pending_update is not None:
                packet.add("update", track.pending_update.norms)
        return packet.read(reduce)

    def _act(self, track: _Track, request: StepRequest, outcome: StepOutcome, fold: bool) -> None:
        actions = outcome.decision.actions
        dropping = "skip" in actions or "rollback" in actions
        if dropping and not fold:
            for param in request.params:
                param.grad = None
        outcome.skipped = dropping
        outcome.rollback = actions.get("rollback")
        outcome.should_stop = outcome.decision.stop_reason is not None
        if "raise" in actions:
            raise GradientAnomalyError(actions["raise"])

    def _report(
        self,
        track: _Track,
        request: StepRequest,
        stats: GradientStats,
        outcome: StepOutcome,
        values: dict[str, list[float]],
    ) -> None:
        self._report_update(track, request.label, values, outcome)
        names = stats.layer_names
        wanted = [
            present and (self.monitor is None or self.monitor.wanted(name))
            for name, present in zip(names, stats.has_grad)
        ]
        counts = self.detection.counts if self.detection is not None else None
        metrics = step_metrics(
            names,
            wanted,
            values,
            label=request.label,
            monitor=self.monitor is not None,
            param_norms=self.monitor is not None and self.monitor.log_param_norms,
            counts=counts,
        )
        outcome.metrics.append((request.log_step, metrics))
        outcome.logged = {
            "step": request.log_step,
            "label": request.label,
            "names": names,
            "wanted": wanted,
            "norms": values["norms"],
            "total": values["total"][0],
            "params": values.get("params"),
            "has_grad": stats.has_grad,
        }

    def _report_update(
        self, track: _Track, label: str, values: dict[str, list[float]], outcome: StepOutcome
    ) -> None:
        pending, track.pending_update = track.pending_update, None
        if pending is None or "update" not in values or self.monitor is None:
            return
        computer = track.computers[self._key(self.monitor)]
        names = computer.layer_names
        ratios = pending.ratios(values["update"])
        wanted = [self.monitor.wanted(name) for name in names]
        outcome.metrics.insert(0, (pending.step, update_ratio_metrics(names, wanted, ratios, label)))

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


class _Default:
    granularity: Granularity = "module"
    norm_type = 2.0


_DEFAULT = _Default()
KIND_NAMES = KINDS
