"""``GradientAnomalyDetection``: catch vanishing, exploding and NaN/Inf gradients by layer."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from grad_guard._validation import check_choice, check_int
from grad_guard.callbacks import shared_pass
from grad_guard.callbacks.base import GradGuardCallback, is_logging_step
from grad_guard.core.detect import (
    DetectionConfig,
    Findings,
    GradientAnomalyDetector,
    KindFindings,
    WarnedLayers,
    judged_for_vanishing,
)
from grad_guard.core.events import (
    EXPLODING_ACTIONS,
    KINDS,
    NONFINITE_ACTIONS,
    VANISHING_ACTIONS,
    AnomalyEvent,
    ExplodingAction,
    GradientAnomalyError,
    GradientAnomalyWarning,
    NonfiniteAction,
    VanishingAction,
)
from grad_guard.core.layers import Granularity
from grad_guard.core.stats import GradientStats, NormType
from grad_guard.loggers import (
    SUMMARY,
    anomaly_charts,
    log_scalars,
    tag,
    tensorboard_writers,
    warn_rank_zero,
    write_layout,
)

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]

COUNTERS = ("nonfinite", "exploding", "vanishing", "amp_overflow", "skipped_steps")
EVENTS_TEXT_TAG = f"{SUMMARY}/anomaly_events"


class GradientAnomalyDetection(GradGuardCallback):
    r"""Detect non-finite, exploding and vanishing gradients, name the layers, and act.

    Hooks ``on_before_optimizer_step``, where the gradients of all micro-batches are
    accumulated and (under ``16-mixed``) unscaled, and reads them in the one statistics
    pass grad_guard shares between its callbacks. The rules run on the device
    (:mod:`grad_guard.core.detect`):

    - **non-finite**: a NaN/Inf in a layer's gradient. The event names every affected
      layer and the likely origin: the affected layer closest to the loss. Under
      ``16-mixed`` with a GradScaler, an overflow the scaler is about to skip is normal
      and only counted as ``amp_overflow``.
    - **exploding**: the total norm is above ``max_total_norm``, or spikes more than
      ``spike_z_threshold`` standard deviations above the mean of the last
      ``spike_window`` finite total norms (after ``spike_warmup_steps`` of them). The
      event names the layers whose own norm spiked (per-layer moving statistics).
    - **vanishing**: a layer's norm stays below ``vanishing_min_norm`` or below
      ``vanishing_min_ratio`` x the largest layer norm of the step for
      ``vanishing_patience`` consecutive steps. Layers without a gradient this step are
      not vanishing, nor are lone 1-D tensors (biases, norm scales under
      ``granularity="parameter"``).

    Actions:

    - ``"warn"``: a rank-zero :class:`~grad_guard.core.events.GradientAnomalyWarning`
      naming the layers, values and threshold; one per layer and condition until the
      layer recovers, with the running count.
    - ``"skip"``: the optimizer does not change the weights this step: every gradient
      of that optimizer is set to ``None`` (zeroing would not do: momentum and weight
      decay would still move the weights), and the step is marked skipped for a clipper
      running after this callback. Lightning has no real skip, so ``global_step`` and
      step-interval LR schedulers still advance; skipped steps are counted. After
      ``max_consecutive_skips`` skips in a row the run stops cleanly.
    - ``"stop"``: ``trainer.should_stop = True``; the run ends after this step, with
      checkpoints as usual.
    - ``"raise"``: :class:`~grad_guard.core.events.GradientAnomalyError`, carrying the
      :class:`~grad_guard.core.events.AnomalyEvent`.

    Under DDP/FSDP every rank takes the same decision: the flags are combined with one
    MAX all-reduce, made by every rank on every step that reads them.

    Host syncs: when any action other than ``"warn"`` is configured (the default
    ``on_nonfinite="skip"`` is one), the flags are copied to the host once per optimizer
    step (one small packed tensor). A ``"warn"``-only configuration keeps the flags on
    the device and reads them at logging steps only, so its warnings and events arrive
    up to ``log_every_n_steps`` steps late (an event's ``step`` is still the step it
    happened at, and ``occurrences`` says how many steps it covers).

    Logged (at logging steps): ``grad_guard/anomalies/<kind>`` (cumulative count of
    steps with a ``nonfinite``, ``exploding``, ``vanishing`` anomaly or an
    ``amp_overflow``) and ``grad_guard/skipped_steps``; every event is also written as
    TensorBoard text under ``grad_guard/anomaly_events``.

    Attributes:
        events: the recorded :class:`~grad_guard.core.events.AnomalyEvent`\ s, oldest
            first (at most ``max_events``; a lasting vanishing condition is one event
            until it clears).
        counts: ``{"nonfinite", "exploding", "vanishing", "amp_overflow",
            "skipped_steps"}`` -> number of steps.

    Args:
        on_nonfinite: ``"skip"`` (default), ``"warn"``, ``"stop"`` or ``"raise"``.
        on_exploding: ``"warn"`` (default), ``"skip"``, ``"stop"`` or ``"raise"``.
        on_vanishing: ``"warn"`` (default), ``"stop"`` or ``"raise"``.
        max_total_norm: absolute limit on the total gradient norm (``None``: none).
        spike_z_threshold: z-score of a total-norm spike (``None`` turns it off).
        spike_window: finite total norms the spike statistics remember.
        spike_warmup_steps: finite steps before spike detection arms.
        vanishing_min_norm: absolute per-layer limit (``None``: none).
        vanishing_min_ratio: per-layer limit as a fraction of the step's largest layer
            norm (``None``: off). The default ``1e-5`` flags a 20-layer sigmoid MLP with
            PyTorch's default init (its first layer gets ~1e-16 of the last layer's
            gradient) and leaves He-initialised ReLU and residual+BatchNorm networks
            (smallest ratio ~0.02) alone.
        vanishing_patience: consecutive steps below the limit before a layer is reported.
        max_consecutive_skips: stop after this many skipped steps in a row.
        log_every_n_steps: logging interval; ``None`` uses the Trainer's.
        granularity: how parameters form layers (``"module"``, ``"parameter"``, int).
        norm_type: p of the gradient p-norm.
        max_events: keep at most this many events (counters keep counting).

    Raises:
        ValueError: if an argument is invalid; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from grad_guard import GradientAnomalyDetection

        detection = GradientAnomalyDetection(on_nonfinite="skip", on_exploding="warn")
        trainer = Trainer(callbacks=[detection])
        trainer.fit(model)
        print(detection.counts, detection.events[:3])

    >>> GradientAnomalyDetection(on_vanishing="skip")
    Traceback (most recent call last):
    ...
    ValueError: `on_vanishing` must be one of 'warn', 'stop', 'raise', got 'skip'
    """

    def __init__(
        self,
        on_nonfinite: NonfiniteAction = "skip",
        on_exploding: ExplodingAction = "warn",
        on_vanishing: VanishingAction = "warn",
        max_total_norm: float | None = None,
        spike_z_threshold: float | None = 6.0,
        spike_window: int = 128,
        spike_warmup_steps: int = 64,
        vanishing_min_norm: float | None = None,
        vanishing_min_ratio: float | None = 1e-5,
        vanishing_patience: int = 10,
        max_consecutive_skips: int = 10,
        log_every_n_steps: int | None = None,
        granularity: Granularity = "module",
        norm_type: NormType = 2.0,
        max_events: int = 1000,
    ) -> None:
        super().__init__(granularity=granularity, norm_type=norm_type)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        self.on_exploding = check_choice("on_exploding", on_exploding, EXPLODING_ACTIONS)
        self.on_vanishing = check_choice("on_vanishing", on_vanishing, VANISHING_ACTIONS)
        self.config = DetectionConfig(
            max_total_norm=max_total_norm,
            spike_z_threshold=spike_z_threshold,
            spike_window=spike_window,
            spike_warmup_steps=spike_warmup_steps,
            vanishing_min_norm=vanishing_min_norm,
            vanishing_min_ratio=vanishing_min_ratio,
            vanishing_patience=vanishing_patience,
        )
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.max_events = check_int("max_events", max_events, minimum=0)

        self.events: list[AnomalyEvent] = []
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.events_dropped = 0
        self._actions = {
            "nonfinite": self.on_nonfinite,
            "exploding": self.on_exploding,
            "vanishing": self.on_vanishing,
        }
        enabled = {
            "nonfinite": True,
            "exploding": self.config.detects_exploding,
            "vanishing": self.config.detects_vanishing,
        }
        # a host decision is needed every step only when some action is not "warn"
        self.reads_every_step = any(
            enabled[kind] and action != "warn" for kind, action in self._actions.items()
        )
        self._detectors: dict[str, GradientAnomalyDetector] = {}
        self._detector_states: dict[str, dict[str, Any]] = {}
        self._consecutive_skips: dict[str, int] = {}
        self._warned = WarnedLayers()
        self._trainer: Callable[[], Any] = lambda: None  # weak: no trainer <-> callback cycle

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            on_nonfinite=self.on_nonfinite,
            on_exploding=self.on_exploding,
            on_vanishing=self.on_vanishing,
            max_total_norm=self.config.max_total_norm,
            spike_z_threshold=self.config.spike_z_threshold,
            spike_window=self.config.spike_window,
            spike_warmup_steps=self.config.spike_warmup_steps,
            vanishing_min_norm=self.config.vanishing_min_norm,
            vanishing_min_ratio=self.config.vanishing_min_ratio,
            vanishing_patience=self.config.vanishing_patience,
            max_consecutive_skips=self.max_consecutive_skips,
            log_every_n_steps=self.log_every_n_steps,
            granularity=self.granularity,
            norm_type=self.norm_type,
        )

    def layout_charts(self) -> dict[str, list[str]]:
        return anomaly_charts()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = weakref.ref(trainer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        label = shared_pass.optimizer_label(trainer, optimizer)
        logging = is_logging_step(trainer, self.log_every_n_steps)
        try:
            context = self.step_context(trainer, pl_module, optimizer)
            detector = self._detector(label, context.computer)
        except Exception as err:  # monitoring must never kill training
            _warn_failure(err)
            return
        try:
            amp = _amp_overflow(trainer, optimizer, context.stats)
            detector.update(context.stats, step=int(trainer.global_step), amp_overflow=amp)
        except Exception as err:
            # still join the read below: under DDP/FSDP the other ranks wait in its all-reduce
            _warn_failure(err)
        if not (self.reads_every_step or logging):
            return
        try:
            findings = detector.read(_max_reducer(trainer))
        except Exception as err:
            _warn_failure(err)
            return
        try:
            self._handle(trainer, optimizer, context, label, findings)
        except GradientAnomalyError:
            raise
        except Exception as err:
            _warn_failure(err)
        if logging:
            self._log_counts(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.flush(trainer)

    # ------------------------------------------------------------------ public

    def flush(self, trainer: Any = None) -> None:
        """Read flags still pending on the device (``"warn"``-only configurations).

        Local to this process (no collective); called at the end of training and before
        the state is saved, so ``events`` and ``counts`` are complete.
        """
        trainer = trainer if trainer is not None else self._trainer()
        for label, detector in self._detectors.items():
            if not detector.steps:
                continue
            try:
                findings = detector.read()
            except Exception as err:
                _warn_failure(err)
                continue
            self._handle(trainer, None, None, label, findings)

    # ------------------------------------------------------------------ internals

    def _detector(self, label: str, computer: Any) -> GradientAnomalyDetector:
        detector = self._detectors.get(label)
        if detector is None or detector.layer_names != computer.layer_names:
            detector = GradientAnomalyDetector(
                computer.layer_names, self.config, judged_for_vanishing(computer.layers)
            )
            state = self._detector_states.pop(label, None)
            if state:
                detector.load_state_dict(state)
            self._detectors[label] = detector
        return detector

    def _handle(
        self,
        trainer: Any,
        optimizer: Optimizer | None,
        context: shared_pass.StepContext | None,
        label: str,
        findings: Findings,
    ) -> None:
        """Count, record, warn, then act on what the latest step showed."""
        self.counts["amp_overflow"] += findings.amp_overflows
        decisions: dict[str, AnomalyEvent] = {}  # action -> event that asks for it
        for found in findings.kinds():
            action = self._actions[found.kind]
            self.counts[found.kind] += found.count
            event = self._record(trainer, found, action)
            if found.now and action != "warn":
                event = event or found.event(action)
                if event is not None:
                    decisions.setdefault(action, event)

        if "raise" in decisions:
            raise GradientAnomalyError(decisions["raise"])
        skipped = False
        if "skip" in decisions and optimizer is not None:
            _skip_step(trainer, optimizer, context)
            skipped = True
            self.counts["skipped_steps"] += 1
        if "stop" in decisions and trainer is not None:
            trainer.should_stop = True
        if optimizer is not None and self.reads_every_step:
            self._count_consecutive(trainer, label, skipped, decisions.get("skip"))

    def _record(self, trainer: Any, found: KindFindings, action: str) -> AnomalyEvent | None:
        """Keep the event, write it to TensorBoard, warn (rate-limited) and update state."""
        event, warn = self._warned.admit(found, action)
        if event is None:
            return None
        if len(self.events) < self.max_events:
            self.events.append(event)
        else:
            self.events_dropped += 1
        if trainer is not None:
            self._write_text(trainer, event)
        if warn:
            seen = self.counts[found.kind]
            rank_zero_warn(
                f"{event.message()} Seen on {seen} step(s) so far; further warnings for "
                f"these layers are held back until they recover. Try: {event.advice()}.",
                category=GradientAnomalyWarning,
            )
        return event

    def _count_consecutive(
        self, trainer: Any, label: str, skipped: bool, event: AnomalyEvent | None
    ) -> None:
        run = self._consecutive_skips.get(label, 0) + 1 if skipped else 0
        self._consecutive_skips[label] = run
        if skipped and run >= self.max_consecutive_skips and trainer is not None:
            trainer.should_stop = True
            reason = event.message() if event is not None else ""
            rank_zero_warn(
                f"grad_guard: {run} consecutive optimizer steps were skipped "
                f"(max_consecutive_skips={self.max_consecutive_skips}); stopping training "
                f"cleanly (trainer.should_stop = True). Last anomaly: {reason}",
                category=GradientAnomalyWarning,
            )

    def _write_text(self, trainer: Any, event: AnomalyEvent) -> None:
        try:
            step = shared_pass.training_step(trainer)
            for writer in tensorboard_writers(trainer):
                writer.add_text(EVENTS_TEXT_TAG, event.markdown(), global_step=step)
        except Exception as err:
            _warn_failure(err)

    def _log_counts(self, trainer: Any) -> None:
        try:
            metrics = {
                tag(SUMMARY, f"anomalies/{kind}"): float(self.counts[kind])
                for kind in (*KINDS, "amp_overflow")
            }
            metrics[tag(SUMMARY, "skipped_steps")] = float(self.counts["skipped_steps"])
            write_layout(trainer)
            log_scalars(trainer, metrics, shared_pass.training_step(trainer))
        except Exception as err:
            _warn_failure(err)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        self.flush()
        detectors = {label: d.state_dict() for label, d in self._detectors.items()}
        for label, state in self._detector_states.items():
            detectors.setdefault(label, state)
        return {
            "counts": dict(self.counts),
            "events": [event.to_dict() for event in self.events],
            "events_dropped": self.events_dropped,
            "consecutive_skips": dict(self._consecutive_skips),
            "warned": self._warned.state_dict(),
            "detectors": detectors,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        counts = state_dict.get("counts", {})
        self.counts = {name: int(counts.get(name, 0)) for name in COUNTERS}
        self.events = [AnomalyEvent.from_dict(e) for e in state_dict.get("events", [])]
        self.events_dropped = int(state_dict.get("events_dropped", 0))
        self._consecutive_skips = dict(state_dict.get("consecutive_skips", {}))
        warned = state_dict.get("warned", {})
        self._warned.load_state_dict(warned)
        # detectors are rebuilt from the saved state; ones without any start fresh
        self._detectors = {}
        self._detector_states = dict(state_dict.get("detectors", {}))


def _skip_step(trainer: Any, optimizer: Optimizer, context: shared_pass.StepContext | None) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None
    if context is not None:
        shared_pass.mark_skipped(trainer, optimizer)


def _amp_overflow(trainer: Any, optimizer: Optimizer, stats: GradientStats) -> Tensor | None:
    """Scalar bool tensor: will the GradScaler skip this step for Inf/NaN? (no host sync)

    Lightning calls ``scaler.unscale_(optimizer)`` before ``on_before_optimizer_step``,
    which records per device whether it found Inf/NaN; ``scaler.step`` skips the step
    when it did. ``None`` when no enabled scaler is in play.
    """
    try:
        scaler = trainer.precision_plugin.scaler
    except AttributeError:
        return None
    if scaler is None or not scaler.is_enabled():
        return None
    state = scaler._per_optimizer_states.get(id(optimizer))
    found = state.get("found_inf_per_device") if state else None
    if found:
        device = stats.layer_norms.device
        return torch.stack([f.to(device).reshape(()) for f in found.values()]).sum() > 0
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        # fused optimizers unscale (and check for Inf/NaN) inside step(): the gradients
        # are still scaled here, and any overflow is the scaler's to skip
        return stats.any_nonfinite
    return None


def _max_reducer(trainer: Any) -> Any:
    """Element-wise MAX over all ranks, or ``None`` for a single process."""
    if int(getattr(trainer, "world_size", 1) or 1) <= 1:
        return None
    if dist is not None and dist.is_available() and dist.is_initialized():

        def reduce(tensor: Tensor) -> Tensor:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            return tensor

        return reduce
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="max")


def _warn_failure(err: Exception) -> None:
    warn_rank_zero(
        f"grad_guard: anomaly detection failed this step and was skipped ({type(err).__name__}: "
        f"{err}). Training continues."
    )


__all__ = ["GradientAnomalyDetection", "GradientAnomalyError"]
