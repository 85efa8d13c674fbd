"""``GradientAnomalyDetection``: catch vanishing, exploding and NaN/Inf gradients by layer."""

from __future__ import annotations

from typing import Any

from grad_guard.callbacks.base import GradGuardCallback
from grad_guard.core.detect import DetectionConfig
from grad_guard.core.events import (
    AnomalyEvent,
    ExplodingAction,
    GradientAnomalyError,
    LossSpikeAction,
    NonfiniteAction,
    VanishingAction,
)
from grad_guard.core.layers import Granularity
from grad_guard.core.policy import AnomalyPolicy
from grad_guard.core.rollback import RollbackConfig
from grad_guard.core.stats import NormType
from grad_guard.loggers import anomaly_charts, warn_rank_zero

#: options that change what the running statistics mean: a resume with other values
#: rebuilds the statistics (counts and events are kept)
_STATISTICS_OPTIONS = ("granularity", "norm_type", "spike_window", "loss_window")


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
      decay would still move the weights); with a fused optimizer (``fused=True`` Adam,
      AdamW, SGD) the skip is folded into its kernel instead (``found_inf``), with no
      host sync. Lightning has no real skip, so ``global_step`` and step-interval LR
      schedulers still advance; skipped steps are counted. After
      ``max_consecutive_skips`` skips in a row the run stops cleanly.
    - ``"rollback"``: restore the last healthy snapshot (weights and buffers, optimizer
      and LR scheduler state, grad_guard's statistics; taken every
      ``snapshot_every_n_steps`` healthy steps, in host memory), drop the step, and skip
      the batch that caused it whenever it comes again (its index within the epoch is
      kept in the checkpoint). Counted in ``counts["rollbacks"]``; after
      ``max_rollbacks`` the run stops. A parameter that is itself non-finite is rolled
      back at once (skipping cannot repair it; without rollback the run stops, naming it).
    - ``"stop"``: ``trainer.should_stop = True``; the run ends after this step, with
      checkpoints as usual.
    - ``"raise"``: :class:`~grad_guard.core.events.GradientAnomalyError`, carrying the
      :class:`~grad_guard.core.events.AnomalyEvent`.

    Under DDP/FSDP every rank takes the same decision: the flags are combined with one
    MAX all-reduce, made by every rank on every step that reads them.

    Host syncs: when an action needs a host decision every step (``"stop"``,
    ``"raise"``, ``"rollback"``, or ``"skip"`` with a non-fused optimizer; the default
    ``on_nonfinite="skip"`` is one), the flags are copied to the host once per optimizer
    step (one small packed tensor). With a fused optimizer the default configuration
    makes no host sync between logging steps. A ``"warn"``-only configuration keeps the flags on
    the device and reads them at logging steps only, so its warnings and events arrive
    up to ``log_every_n_steps`` steps late (an event's ``step`` is still the step it
    happened at, and ``occurrences`` says how many steps it covers).

    Logged (at logging steps): ``grad_guard/anomalies/<kind>`` (cumulative count of
    steps with a ``nonfinite``, ``exploding``, ``vanishing`` anomaly or an
    ``amp_overflow``), ``grad_guard/skipped_steps`` and ``grad_guard/rollbacks``; every
    event is also written as
    TensorBoard text under ``grad_guard/anomaly_events``.

    Attributes:
        events: the recorded :class:`~grad_guard.core.events.AnomalyEvent`\ s, oldest
            first (at most ``max_events``; a lasting vanishing condition is one event
            until it clears).
        counts: ``{"nonfinite", "exploding", "vanishing", "amp_overflow",
            "skipped_steps"}`` -> number of steps.

    Args:
        on_nonfinite: ``"skip"`` (default), ``"rollback"``, ``"warn"``, ``"stop"`` or
            ``"raise"``.
        on_exploding: ``"warn"`` (default), ``"skip"``, ``"rollback"``, ``"stop"`` or
            ``"raise"``.
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
        on_loss_spike: ``"warn"`` (default), ``"skip"``, ``"rollback"``, ``"stop"`` or
            ``"raise"`` when the training loss (the ``training_step`` output) is
            non-finite or spikes.
        loss_z_threshold: z-score of a loss spike (``None``: only a non-finite loss).
        loss_window: finite losses the loss statistics remember.
        loss_warmup_steps: finite losses before the loss rule arms.
        snapshot_every_n_steps: with a ``"rollback"`` action: steps between snapshots of
            the healthy state (weights, optimizer and scheduler state, grad_guard's
            statistics), kept in host memory.
        max_rollbacks: stop the run cleanly after this many rollbacks.
        lr_factor: after a rollback, multiply the learning rate by this for
            ``cooldown_steps`` steps (``1.0``: no cool-down).
        cooldown_steps: how long the cool-down lasts.

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

    role = "detection"

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
        on_loss_spike: LossSpikeAction = "warn",
        loss_z_threshold: float | None = 6.0,
        loss_window: int = 128,
        loss_warmup_steps: int = 32,
        snapshot_every_n_steps: int = 100,
        max_rollbacks: int = 5,
        lr_factor: float = 1.0,
        cooldown_steps: int = 0,
    ) -> None:
        super().__init__(log_every_n_steps)
        self.config = DetectionConfig(
            max_total_norm=max_total_norm,
            spike_z_threshold=spike_z_threshold,
            spike_window=spike_window,
            spike_warmup_steps=spike_warmup_steps,
            vanishing_min_norm=vanishing_min_norm,
            vanishing_min_ratio=vanishing_min_ratio,
            vanishing_patience=vanishing_patience,
            loss_z_threshold=loss_z_threshold,
            loss_window=loss_window,
            loss_warmup_steps=loss_warmup_steps,
        )
        self.policy = AnomalyPolicy(
            self.config,
            on_nonfinite,
            on_exploding,
            on_vanishing,
            on_loss_spike,
            max_consecutive_skips,
            max_events,
            granularity,
            norm_type,
            RollbackConfig(
                snapshot_every_n_steps=snapshot_every_n_steps,
                max_rollbacks=max_rollbacks,
                lr_factor=lr_factor,
                cooldown_steps=cooldown_steps,
            ),
        )
        self.on_nonfinite = on_nonfinite
        self.on_exploding = on_exploding
        self.on_vanishing = on_vanishing
        self.on_loss_spike = on_loss_spike
        self.max_consecutive_skips = max_consecutive_skips
        self.max_events = max_events
        self.granularity = self.policy.granularity
        self.norm_type = self.policy.norm_type
        self._saved_detectors: dict[Any, Any] = {}

    @property
    def counts(self) -> dict[str, int]:
        """Steps per anomaly kind, ``amp_overflow``, ``skipped_steps`` and ``rollbacks``."""
        return self.policy.counts

    @property
    def events(self) -> list[AnomalyEvent]:
        """The recorded anomaly events, oldest first."""
        return self.policy.events

    @property
    def reads_every_step(self) -> bool:
        """Whether the flags are read on the host every step (with a non-fused optimizer)."""
        return self.policy.needs_host_decision(dropping_folded=False)

    @property
    def events_dropped(self) -> int:
        return self.policy.events_dropped

    @property
    def state_key(self) -> str:
        return self._generate_state_key()

    def layout_charts(self) -> dict[str, list[str]]:
        return anomaly_charts()

    def engine_part(self) -> AnomalyPolicy:
        return self.policy

    def run_config(self) -> dict[str, Any]:
        return {"detection": {f"on_{kind}": a for kind, a in self.policy.actions.items()}}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._session is not None and self._saved_detectors:
            self._session.saved_detectors = dict(self._saved_detectors)

    # ------------------------------------------------------------------ state

    def _options(self) -> dict[str, Any]:
        c = self.config
        return {
            "granularity": self.granularity,
            "norm_type": self.norm_type,
            "spike_window": c.spike_window,
            "loss_window": c.loss_window,
        }

    def state_dict(self) -> dict[str, Any]:
        session = self._session
        if session is not None:
            self.flush(session.trainer())  # events and counts complete in the checkpoint
        if session is not None and session.engine is not None:
            detectors = session.engine.detector_states()
        elif session is not None and session.saved_detectors:
            detectors = dict(session.saved_detectors)  # restored, not used yet
        else:
            detectors = dict(self._saved_detectors)
        return {**self.policy.state_dict(), "detectors": detectors, "options": self._options()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict)
        saved = state_dict.get("options", {})
        changed = [name for name in _STATISTICS_OPTIONS if name in saved and saved[name] != self._options()[name]]
        if changed:
            warn_rank_zero(
                f"grad_guard: GradientAnomalyDetection was saved with other {', '.join(changed)}; "
                "counts and events are kept, the running statistics (spike windows, "
                "per-layer EMAs, vanishing streaks) start afresh."
            )
            self._saved_detectors = {}
        else:
            self._saved_detectors = dict(state_dict.get("detectors", {}))
        if self._session is not None:
            self._session.saved_detectors = dict(self._saved_detectors)


__all__ = ["GradientAnomalyDetection", "GradientAnomalyError"]
