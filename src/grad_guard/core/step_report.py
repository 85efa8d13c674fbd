"""The host copy of a step and its report: one packet, then tags and history values."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from grad_guard.core.clip import ClipResult
from grad_guard.core.metrics import step_metrics, update_ratio_metrics
from grad_guard.core.packet import HostPacket
from grad_guard.core.stats import GradientStats
from grad_guard.core.step import StepOutcome, StepRequest
from grad_guard.core.track import OptimizerTrack, detection_packet, pass_key
from grad_guard.core.update_ratio import UpdateSnapshot


def wanted_layers(engine: Any, track: OptimizerTrack, names: tuple[str, ...]) -> list[bool]:
    """Which of ``names`` the monitor reports (its include/exclude patterns), cached."""
    if track.wanted is None or track.wanted[0] is not names:
        monitor = engine.monitor
        flags = [True] * len(names) if monitor is None else [monitor.wanted(n) for n in names]
        track.wanted = (names, flags)
    return track.wanted[1]


def read_step(
    engine: Any,
    track: OptimizerTrack,
    request: StepRequest,
    stats: GradientStats,
    clip: ClipResult | None,
    clipper: Any,
    coefficient: Tensor | None = None,
) -> dict[str, list[float]]:
    """One host copy of everything this step reports (flags always, figures when logging).

    ``coefficient``: a clip factor not multiplied in yet, read as ``values["coefficient"]``.
    """
    packet = HostPacket()
    if coefficient is not None:
        packet.add("coefficient", coefficient)
    reduce = {}
    if track.detector is not None:
        packet.add("detection", detection_packet(track))
        if request.reduce is not None:  # one collective for all flags and counters
            reduce = {"detection": request.reduce}
    if request.logging:
        packet.add("norms", stats.layer_norms)
        packet.add("total", stats.total_norm)
        if engine.monitor is not None and (
            engine.monitor.log_param_norms or engine.monitor.log_update_ratio
        ):
            computer = track.computers[pass_key(engine.monitor)]
            param_norms = computer.parameter_norms()
            packet.add("params", param_norms)
            if engine.monitor.log_update_ratio:
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


def report_step(
    engine: Any,
    track: OptimizerTrack,
    request: StepRequest,
    stats: GradientStats,
    outcome: StepOutcome,
    values: dict[str, list[float]],
) -> None:
    """The metrics and history values of a logging step, from its host copy."""
    report_update(engine, track, request.label, values, outcome)
    names = stats.layer_names
    wanted = [
        present and wanted
        for wanted, present in zip(wanted_layers(engine, track, names), stats.has_grad)
    ]
    counts = engine.detection.counts if engine.detection is not None else None
    metrics = step_metrics(
        names,
        wanted,
        values,
        label=request.label,
        monitor=engine.monitor is not None,
        param_norms=engine.monitor is not None and engine.monitor.log_param_norms,
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

def report_update(
    engine: Any,
    track: OptimizerTrack,
    label: str,
    values: dict[str, list[float]],
    outcome: StepOutcome,
) -> None:
    """``update_ratio/<layer>`` of the last logging step, once its norms were copied."""
    pending, track.pending_update = track.pending_update, None
    if pending is None or "update" not in values or engine.monitor is None:
        return
    computer = track.computers[pass_key(engine.monitor)]
    names = computer.layer_names
    ratios = pending.ratios(values["update"])
    wanted = wanted_layers(engine, track, names)
    outcome.metrics.insert(0, (pending.step, update_ratio_metrics(names, wanted, ratios, label)))
