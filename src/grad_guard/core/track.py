"""What the engine keeps per optimizer: its passes, rules, fold and pending reads.

:func:`build_track` makes a track when an optimizer's parameters first appear (or
change); :func:`update_rules` runs its anomaly rules on the device each step and
:func:`count_drop` counts a dropped step;
:func:`decide_read` turns a host copy of the rules' flags into the policy's decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.detect import Findings, GradientAnomalyDetector, judged_for_vanishing
from grad_guard.core.fused import FusedFold, is_fused
from grad_guard.core.layers import Granularity
from grad_guard.core.policy import AnomalyPolicy, Decision
from grad_guard.core.stats import GradientStats, GradientStatsComputer
from grad_guard.core.step import StepRequest
from grad_guard.core.update_ratio import UpdateNorms, UpdateSnapshot

PassKey = tuple[Granularity, float]


class OptimizerTrack:
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
        self.wanted: tuple[tuple[str, ...], list[bool]] | None = None  # monitor filter, cached
        self.plain = True  # plain tensors only (no DTensor, no shards): inference_mode works

    def device_mode(self) -> contextlib.AbstractContextManager:
        """Where the step's device ops run: ``inference_mode`` for plain tensors (cheaper
        small ops), else ``no_grad`` (``DTensor`` refuses inference tensors)."""
        return torch.inference_mode() if self.plain else torch.no_grad()


def pass_key(part: Any) -> PassKey:
    """The statistics pass a part reads: ``(granularity, norm_type)``."""
    return (part.granularity, float(part.norm_type))


def build_track(
    engine: Any, request: StepRequest, old: OptimizerTrack | None, saved: dict[str, Any] | None
) -> OptimizerTrack:
    """A new track for ``request``'s parameters; ``old``'s detector statistics and fused
    fold carry over (``saved``: detector statistics restored from a checkpoint)."""
    track = OptimizerTrack(request.signature)
    parts = [p for p in (engine.monitor, engine.detection, engine.clipping) if p is not None]
    for part in parts or [DEFAULT_PART]:
        key = pass_key(part)
        if key not in track.computers:
            track.computers[key] = GradientStatsComputer(
                request.layers(key[0]), key[1], process_group=request.process_group
            )
    track.plain = all(computer.planned for computer in track.computers.values())
    if engine.detection is not None:
        computer = track.computers[pass_key(engine.detection)]
        track.detector = GradientAnomalyDetector(
            computer.layer_names, engine.detection.config, judged_for_vanishing(computer.layers)
        )
        if saved is None and old is not None and old.detector is not None:
            saved = old.detector.state_dict()
        if saved:
            track.detector.load_state_dict(saved)
    if engine.clipping is not None and request.module is not None:
        engine.clipping.for_key(request.key, request.first).bind(request.module)
    if request.optimizer is not None and is_fused(request.optimizer):
        reuse = old is not None and old.fold is not None
        track.fold = old.fold if reuse else FusedFold(request.optimizer)  # type: ignore[union-attr]
    return track


def update_rules(
    track: OptimizerTrack,
    policy: AnomalyPolicy | None,
    request: StepRequest,
    stats: GradientStats,
) -> Tensor | None:
    """Run the rules on the device; return the flag "drop this step" (``None``: no rule
    drops, or a step without gradients)."""
    detector = track.detector
    if detector is None or policy is None or stats.no_gradients:
        return None
    amp = request.amp_overflow
    if amp is None and request.grad_scale is not None:
        amp = stats.any_nonfinite  # still scaled: an overflow is the scaler's to skip
    detector.update(stats, request.step, amp, request.loss)
    if detector.now is None:
        return None
    if track.drop_mask is None:
        now = detector.now
        track.drop_mask = torch.tensor(policy.dropping, dtype=now.dtype, device=now.device)
        track.dropped = torch.zeros((), dtype=now.dtype, device=now.device)
        track.streak = torch.zeros((), dtype=now.dtype, device=now.device)
    if not any(policy.dropping):
        return None
    return torch.dot(detector.now, track.drop_mask) > 0


def count_drop(track: OptimizerTrack, drop: Tensor | None) -> None:
    """Count a dropped step and the streak of them on the device (once it is certain)."""
    if drop is not None and track.dropped is not None and track.streak is not None:
        track.dropped = track.dropped + drop
        track.streak = (track.streak + 1) * drop


def decide_read(
    track: OptimizerTrack,
    policy: AnomalyPolicy,
    values: list[float],
    label: str,
    act: bool = True,
    nonfinite_parameter: Callable[[], str | None] | None = None,
) -> tuple[Findings, Decision]:
    """The findings in the host copy of :func:`detection_packet` and the policy's
    decision on them; clears the pending flags and the drop count."""
    assert track.detector is not None
    findings = track.detector.decode(values[:-2])
    track.detector.clear_pending()
    dropped, streak = (round(v) for v in values[-2:])
    if track.dropped is not None:
        track.dropped = torch.zeros_like(track.dropped)
    return findings, policy.decide(
        findings, label, dropped, streak, act=act, nonfinite_parameter=nonfinite_parameter
    )


def detection_packet(track: OptimizerTrack) -> Tensor:
    """The detector's packed flags, then dropped steps and the drop streak (2 values)."""
    assert track.detector is not None
    packed = track.detector.pack()
    if track.dropped is None or track.streak is None:
        return torch.cat([packed, packed.new_zeros(2)])
    return torch.cat([packed, torch.stack([track.dropped, track.streak]).to(packed)])


class _DefaultPart:
    granularity: Granularity = "module"
    norm_type = 2.0


DEFAULT_PART = _DefaultPart()
"""The pass made when no part is configured."""
