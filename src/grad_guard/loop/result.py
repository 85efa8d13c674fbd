"""What :meth:`GradientGuard.step` returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from grad_guard.core.events import AnomalyEvent
from grad_guard.core.stats import GradientStats
from grad_guard.core.step import StepOutcome


@dataclass
class GuardStep:
    """What :meth:`GradientGuard.step` found and did.

    Attributes:
        step: the step number used for logging and events.
        should_step: ``False`` when the step was skipped (its gradients are now
            ``None``, so an ``optimizer.step()`` would leave the weights alone anyway).
            With a fused optimizer the skip happens inside ``optimizer.step()``, and this
            stays ``True``.
        should_stop: ``True`` when a ``"stop"`` action fired, or too many steps in a row
            were skipped: end the loop.
        pre_clip_norm: total gradient norm before clipping (scalar device tensor).
        post_clip_norm: total gradient norm after clipping (the same tensor when nothing
            clips).
        clip_threshold: the bound the clipper applied (scalar tensor), ``None`` without
            a clipper.
        events: the anomalies reported by this call.
        stats: the statistics pass of the raw (pre-clip) gradients.
        folded: clipping and skipping were folded into the fused optimizer's kernel.
        restored_step: when the step rolled the model and optimizer back to the last
            healthy snapshot, that snapshot's step; else ``None``.
    """

    step: int
    should_step: bool
    should_stop: bool
    pre_clip_norm: Tensor
    post_clip_norm: Tensor
    clip_threshold: Tensor | None = None
    events: list[AnomalyEvent] = field(default_factory=list)
    stats: GradientStats | None = field(default=None, repr=False)
    folded: bool = False
    restored_step: int | None = None

    @classmethod
    def from_outcome(cls, step: int, outcome: StepOutcome) -> GuardStep:
        """What the engine's ``outcome`` of step ``step`` means for the loop."""
        stats, clip = outcome.stats, outcome.clip
        if stats is not None:  # copies: the engine's own tensors are inference tensors
            stats = replace(
                stats,
                layer_norms=stats.layer_norms.clone(),
                total_norm=stats.total_norm.clone(),
                nonfinite=stats.nonfinite.clone(),
            )
        total = stats.total_norm if stats is not None else torch.zeros(())
        return cls(
            step=step,
            should_step=not outcome.skipped,
            should_stop=outcome.should_stop,
            pre_clip_norm=total,
            post_clip_norm=clip.post_norm.clone() if clip is not None else total,
            clip_threshold=clip.threshold.clone() if clip is not None else None,
            events=outcome.decision.events,
            stats=stats,
            folded=outcome.folded,
            restored_step=outcome.restored_step,
        )
