"""``GradientGuard``: grad_guard in your own training loop (plain PyTorch or Lightning Fabric).

The Lightning callbacks hook ``on_before_optimizer_step``; a hand-written loop calls
:meth:`GradientGuard.step` at the same point, between ``loss.backward()`` and
``optimizer.step()``. Both are thin front ends over the same
:class:`~grad_guard.core.engine.StepEngine`: :mod:`grad_guard.loop.request` builds the
step's request, :mod:`grad_guard.loop.report` turns the outcome into warnings and writer
calls, and :meth:`GuardStep.from_outcome` into the result. No Lightning import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from grad_guard._validation import check_bool, check_instance, check_int
from grad_guard.core.clip import ClipAlgorithm, ClipShortcut, resolve_algorithm
from grad_guard.core.detect import DetectionConfig
from grad_guard.core.engine import StepEngine, StepOutcome
from grad_guard.core.events import (
    AnomalyEvent,
    ExplodingAction,
    LossSpikeAction,
    NonfiniteAction,
    VanishingAction,
)
from grad_guard.core.layers import Granularity, optimizer_layers
from grad_guard.core.parts import ClippingPart, MonitorPart
from grad_guard.core.policy import AnomalyPolicy
from grad_guard.core.rollback import RollbackConfig
from grad_guard.core.stats import validate_norm_type
from grad_guard.loop.report import check_writer, warn_outcome, write_outcome
from grad_guard.loop.request import loop_request
from grad_guard.loop.result import GuardStep
from grad_guard.loop.unwrap import unwrap_model


class GradientGuard:
    r"""Monitor, check and clip gradients in a hand-written training loop.

    Call :meth:`step` after ``loss.backward()`` (or ``fabric.backward(loss)``) and before
    ``optimizer.step()``. Each call:

    1. reads every layer's gradient once (per-layer norms, total norm, NaN/Inf flags);
    2. runs the anomaly rules of :class:`~grad_guard.GradientAnomalyDetection` on the
       device and acts: ``"skip"`` sets the gradients to ``None`` and returns
       ``should_step=False``, ``"stop"`` returns ``should_stop=True``, ``"raise"``
       raises :class:`~grad_guard.GradientAnomalyError`, ``"warn"`` warns once per layer
       until it recovers;
    3. clips with ``clipping``; with a fused optimizer (``fused=True`` Adam, AdamW, SGD)
       a one-factor clip and the skip are folded into its kernel, so call
       ``optimizer.step()`` whatever ``should_step`` says;
    4. every ``log_every_n_steps`` steps writes the same tags as the Lightning callbacks.

    Use one guard per optimizer; with a ``GradScaler``, call ``scaler.unscale_(optimizer)``
    first; under DDP give the writer to rank 0 only. Each stage in detail (the tags, the
    fused fold, when the host is asked): ``docs/gradient_guard.md``.

    Args:
        model: the model (a Fabric-wrapped, DDP-wrapped or compiled model is unwrapped, so
            layer names match the plain model's).
        optimizer: when given, only its parameters are watched, and a skip sets the
            gradients of all its parameters to ``None``.
        clipping: a clipping algorithm (``ZClip()``, ``AutoClip()``, ``NormClip(1.0)``,
            ``ValueClip(0.5)``, ``AGC()``), a shortcut (``"zscore"``, ``"autoclip"``,
            ``"norm"``, ``"value"``, ``"agc"``), or ``None`` for no clipping. Default
            ``"zscore"`` (as ``GradGuard``): ZClip acts only on spikes, after a warm-up.
        detection: ``True`` (default) for anomaly detection with the default thresholds, a
            :class:`~grad_guard.core.detect.DetectionConfig` for your own, ``False`` for
            none (the NaN flags are still computed and logged with the norms).
        writer: where scalars go: a ``torch.utils.tensorboard.SummaryWriter`` (or
            anything with ``add_scalar``), a Lightning/Fabric logger (anything with
            ``log_metrics(metrics, step)``), or ``None`` to log nothing.
        log_every_n_steps: write every N steps (step 0 included).
        on_nonfinite: ``"skip"`` (default), ``"warn"``, ``"stop"`` or ``"raise"``.
        on_exploding: ``"warn"`` (default), ``"skip"``, ``"stop"`` or ``"raise"``.
        on_vanishing: ``"warn"`` (default), ``"stop"`` or ``"raise"``.
        on_loss_spike: ``"warn"`` (default), ``"skip"``, ``"rollback"``, ``"stop"`` or
            ``"raise"``; judged when :meth:`step` is given the ``loss``.
        max_consecutive_skips: after this many skipped steps in a row ``should_stop``
            becomes ``True``.
        norm_type: p of the per-layer norms; ``None`` (default) takes the clipper's
            (``2.0`` without one).
        granularity: ``"module"`` (default), ``"parameter"`` or an int depth (see
            :func:`grad_guard.group_parameters`).
        include: regex or list of regexes; log only the layers whose name matches one.
        exclude: regex or list of regexes; do not log the layers whose name matches one.
        log_param_norms: also write ``param_norm`` and ``grad_to_param``.
        log_update_ratio: also write ``update_ratio`` (copies the weights on logging
            steps).
        fold_into_optimizer: fold clipping and skipping into a fused optimizer's kernel
            (default ``True``); ``False`` multiplies the gradients in place, for code
            between this call and ``optimizer.step()`` that must see them clipped.
        rollback: snapshots and limits of the ``"rollback"`` action (a
            :class:`~grad_guard.core.rollback.RollbackConfig`); a rollback restores the
            ``model`` and ``optimizer`` given here, in place.

    Attributes:
        events: the reported :class:`~grad_guard.core.events.AnomalyEvent`\ s, oldest
            first (the first 1000; ``counts`` keeps counting).
        counts: steps with a ``nonfinite``, ``exploding``, ``vanishing``,
            ``loss_spike`` anomaly, ``amp_overflow``, ``skipped_steps`` and ``rollbacks``.
        layer_names: the watched layers, forward order.
        should_stop: ``True`` once any step asked to stop.

    Raises:
        ValueError: if an argument is invalid; the message names it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from grad_guard import NormClip
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = GradientGuard(model, optimizer, clipping=NormClip(max_norm=1.0))
        >>> for step in range(3):
        ...     optimizer.zero_grad()
        ...     loss = model(torch.randn(16, 4)).pow(2).mean()
        ...     loss.backward()
        ...     result = guard.step(step)
        ...     if result.should_step:
        ...         optimizer.step()
        >>> bool(result.post_clip_norm <= 1.0 + 1e-6), guard.layer_names
        (True, ('0', '2'))
        >>> GradientGuard(model, on_vanishing="skip")
        Traceback (most recent call last):
        ...
        ValueError: `on_vanishing` must be one of 'warn', 'stop', 'raise', got 'skip'
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        clipping: ClipAlgorithm | ClipShortcut | None = "zscore",
        detection: bool | DetectionConfig = True,
        writer: Any = None,
        log_every_n_steps: int = 50,
        on_nonfinite: NonfiniteAction = "skip",
        on_exploding: ExplodingAction = "warn",
        on_vanishing: VanishingAction = "warn",
        on_loss_spike: LossSpikeAction = "warn",
        max_consecutive_skips: int = 10,
        norm_type: float | str | None = None,
        granularity: Granularity = "module",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
        fold_into_optimizer: bool = True,
        rollback: RollbackConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {model!r}")
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer or None, got {optimizer!r}")
        check_writer(writer)
        if isinstance(detection, bool):
            config = DetectionConfig() if detection else None
        elif isinstance(detection, DetectionConfig):
            config = detection
        else:
            raise ValueError(f"`detection` must be a bool or a DetectionConfig, got {detection!r}")
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.writer = writer
        self.clipping = None if clipping is None else resolve_algorithm(clipping, "clipping")
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps)
        self.fold_into_optimizer = check_bool("fold_into_optimizer", fold_into_optimizer)
        if norm_type is None:
            norm_type = self.clipping.norm_type if self.clipping is not None else 2.0
        self.norm_type = validate_norm_type(norm_type)
        self.monitor = MonitorPart(
            granularity, self.norm_type, include, exclude, log_param_norms, log_update_ratio
        )
        policy = None
        if config is not None:
            policy = AnomalyPolicy(
                config,
                on_nonfinite,
                on_exploding,
                on_vanishing,
                on_loss_spike,
                max_consecutive_skips,
                granularity=granularity,
                norm_type=self.norm_type,
                rollback=check_instance(
                    "rollback", rollback, RollbackConfig, "a RollbackConfig or None", allow_none=True
                ),
            )
        else:  # the actions are still checked, for a clear error
            AnomalyPolicy(DetectionConfig(), on_nonfinite, on_exploding, on_vanishing, on_loss_spike)
        self.detection = policy
        self._engine = StepEngine(
            self.monitor, policy, ClippingPart(self.clipping) if self.clipping else None
        )
        groups = optimizer.param_groups if optimizer is not None else None
        self.layer_names = tuple(
            layer.name for layer in optimizer_layers(self.model, groups, granularity)
        )
        self.steps = 0  # calls to step()
        self.should_stop = False
        self._layout_written = False
        self._fallback_counts: dict[str, int] = {}

    @property
    def counts(self) -> dict[str, int]:
        """Steps per anomaly kind, ``amp_overflow``, ``skipped_steps`` and ``rollbacks``."""
        return self.detection.counts if self.detection is not None else self._fallback_counts

    @property
    def events(self) -> list[AnomalyEvent]:
        """The recorded anomaly events, oldest first."""
        return self.detection.events if self.detection is not None else []

    # ------------------------------------------------------------------ public

    def step(
        self, step: int | None = None, loss: Tensor | None = None, batch_index: int | None = None
    ) -> GuardStep:
        """Check, clip and log the current gradients; call before ``optimizer.step()``.

        Args:
            step: the step number for logging and events; default: the number of
                previous calls.
            loss: the step's training loss, for the loss-spike rule (optional).
            batch_index: the batch's index within its epoch: a batch that caused a
                rollback is skipped (``should_step=False``) whenever it comes again.

        Returns:
            A :class:`GuardStep`: ``should_step``, ``should_stop``, pre/post-clip norms.

        Raises:
            GradientAnomalyError: when an anomaly whose action is ``"raise"`` happened.
        """
        step = self.steps if step is None else int(step)
        self.steps += 1
        self._engine.after_step(0)  # the optimizer has stepped since the last call
        logging = step % self.log_every_n_steps == 0
        request = loop_request(
            self.model, self.optimizer, step, loss, batch_index, logging, self.fold_into_optimizer
        )
        outcome = self._engine.step(request)
        self._emit(outcome)
        return GuardStep.from_outcome(step, outcome)

    def flush(self) -> None:
        """Write what is still pending: the last update ratios and ``"warn"``-only flags.

        Call once after the loop (the writer itself is yours to flush and close).
        """
        self._emit(self._engine.flush(0, ""))

    def state_dict(self) -> dict[str, Any]:
        """Clipper and detector statistics, counters and events, for a checkpoint."""
        self.flush()
        return {
            "steps": self.steps,
            "detection": self.detection.state_dict() if self.detection is not None else None,
            "clipping": self.clipping.state_dict() if self.clipping is not None else None,
            "detector": self._engine.detector_states().get(0),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next step continues where the saved run was."""
        self.steps = int(state_dict.get("steps", 0))
        if self.detection is not None and state_dict.get("detection") is not None:
            self.detection.load_state_dict(state_dict["detection"])
        if self.clipping is not None and state_dict.get("clipping") is not None:
            self.clipping.load_state_dict(state_dict["clipping"])
        if state_dict.get("detector") is not None:
            self._engine.load_detector_states({0: state_dict["detector"]})

    # ------------------------------------------------------------------ internals

    def _emit(self, outcome: StepOutcome) -> None:
        """Warn, write and remember what the engine decided (after it acted)."""
        self.should_stop = self.should_stop or outcome.should_stop
        warn_outcome(outcome)
        if self.writer is None:
            return
        layout = None if self._layout_written else (self.monitor, self.detection, self.clipping)
        self._layout_written = True
        write_outcome(self.writer, outcome, layout)
