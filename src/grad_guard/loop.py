"""``GradientGuard``: grad_guard in your own training loop (plain PyTorch or Lightning Fabric).

The Lightning callbacks hook ``on_before_optimizer_step``; a hand-written loop calls
:meth:`GradientGuard.step` at the same point, between ``loss.backward()`` and
``optimizer.step()``. One call reads the gradients once (one ``torch._foreach_norm``
pass), runs the anomaly rules on the device, clips, and on logging steps writes the
same TensorBoard tags as the callbacks. Built on :mod:`grad_guard.core` only: no
Lightning import.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from grad_guard._validation import check_choice, check_int
from grad_guard.core.clip import ClipAlgorithm, ClipResult, ClipShortcut, resolve_algorithm
from grad_guard.core.detect import (
    DetectionConfig,
    GradientAnomalyDetector,
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
from grad_guard.core.layers import Granularity, compile_patterns, group_parameters
from grad_guard.core.stats import (
    GradientStats,
    GradientStatsComputer,
    total_from_layer_norms,
    validate_norm_type,
)
from grad_guard.loggers import (
    SUMMARY,
    UPDATE_RATIO,
    anomaly_charts,
    clip_metrics,
    clipping_charts,
    custom_scalars_layout,
    layer_metrics,
    monitor_charts,
    tag,
    write_scalars,
)

COUNTERS = ("nonfinite", "exploding", "vanishing", "skipped_steps")
MAX_EVENTS = 1000


@dataclass
class GuardStep:
    """What :meth:`GradientGuard.step` found and did.

    Attributes:
        step: the step number used for logging and events.
        should_step: ``False`` when the step was skipped (its gradients are now
            ``None``, so an ``optimizer.step()`` would leave the weights alone anyway).
        should_stop: ``True`` when an ``"stop"`` action fired, or too many steps in a row
            were skipped: end the loop.
        pre_clip_norm: total gradient norm before clipping (scalar device tensor).
        post_clip_norm: total gradient norm after clipping (the same tensor when nothing
            clips, or the step was skipped).
        clip_threshold: the bound the clipper applied (scalar tensor), ``None`` without
            a clipper or on a skipped step.
        events: the anomalies reported by this call.
        stats: the statistics pass of the raw (pre-clip) gradients.
    """

    step: int
    should_step: bool
    should_stop: bool
    pre_clip_norm: Tensor
    post_clip_norm: Tensor
    clip_threshold: Tensor | None = None
    events: list[AnomalyEvent] = field(default_factory=list)
    stats: GradientStats | None = field(default=None, repr=False)


class GradientGuard:
    r"""Monitor, check and clip gradients in a hand-written training loop.

    Call :meth:`step` after ``loss.backward()`` (or ``fabric.backward(loss)``) and before
    ``optimizer.step()``. Each call:

    1. reads every layer's gradient once (per-layer norms, total norm, NaN/Inf flags);
    2. runs the anomaly rules of :class:`~grad_guard.GradientAnomalyDetection` on the
       device and acts: ``"skip"`` sets the gradients to ``None`` (so momentum and
       weight decay do not move the weights either) and returns ``should_step=False``;
       ``"stop"`` returns ``should_stop=True``; ``"raise"`` raises
       :class:`~grad_guard.GradientAnomalyError`; ``"warn"`` warns once per layer until it
       recovers;
    3. clips with ``clipping`` (any :class:`~grad_guard.core.clip.ClipAlgorithm`);
    4. every ``log_every_n_steps`` steps writes the same tags as the Lightning callbacks:
       ``grad_norm/<layer>``, ``param_norm/<layer>``, ``grad_to_param/<layer>``,
       ``update_ratio/<layer>`` (measured at the next call, once the optimizer has moved
       the weights, and written with the next logging step or by :meth:`flush`),
       ``grad_guard/total_grad_norm`` (pre-clip), ``grad_guard/clip/{pre_norm,
       post_norm, threshold, clipped_fraction}``, ``grad_guard/anomalies/<kind>`` and
       ``grad_guard/skipped_steps``.

    Between logging steps nothing is copied to the host, except one small tensor per
    step when an action other than ``"warn"`` needs a decision now (the default
    ``on_nonfinite="skip"`` does; a GradScaler makes the same check).

    Use one guard per optimizer. With a ``GradScaler``, call ``scaler.unscale_(optimizer)``
    first, as for ``clip_grad_norm_`` (an fp16 overflow is then reported as non-finite;
    the scaler would skip that step anyway). Under DDP every rank holds the same
    all-reduced gradients and takes the same decisions; give the writer to rank 0 only.

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

    Attributes:
        events: the reported :class:`~grad_guard.core.events.AnomalyEvent`\ s, oldest
            first (the first 1000; ``counts`` keeps counting).
        counts: steps with a ``nonfinite``, ``exploding``, ``vanishing`` anomaly, and
            ``skipped_steps``.
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
        max_consecutive_skips: int = 10,
        norm_type: float | str | None = None,
        granularity: Granularity = "module",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.clipping = None if clipping is None else resolve_algorithm(clipping, "clipping")
        if isinstance(detection, bool):
            config = DetectionConfig() if detection else None
        elif isinstance(detection, DetectionConfig):
            config = detection
        else:
            raise ValueError(f"`detection` must be a bool or a DetectionConfig, got {detection!r}")
        if writer is not None and not (
            callable(getattr(writer, "add_scalar", None))
            or callable(getattr(writer, "log_metrics", None))
        ):
            raise ValueError(
                "`writer` must be a SummaryWriter (has `add_scalar`), a logger (has "
                f"`log_metrics`) or None, got {type(writer).__name__}"
            )
        self.writer = writer
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps)
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        self.on_exploding = check_choice("on_exploding", on_exploding, EXPLODING_ACTIONS)
        self.on_vanishing = check_choice("on_vanishing", on_vanishing, VANISHING_ACTIONS)
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips)
        if norm_type is None:
            norm_type = self.clipping.norm_type if self.clipping is not None else 2.0
        self.norm_type = validate_norm_type(norm_type)
        self._include = compile_patterns("include", include)
        self._exclude = compile_patterns("exclude", exclude)
        self.log_param_norms = bool(log_param_norms)
        self.log_update_ratio = bool(log_update_ratio)

        parameters = None
        if optimizer is not None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
        layers = group_parameters(self.model, granularity, parameters=parameters)
        self._computer = GradientStatsComputer(layers, self.norm_type)
        self.layer_names = self._computer.layer_names
        self._logged = [self._wanted(name) for name in self.layer_names]
        self._detector = (
            GradientAnomalyDetector(self.layer_names, config, judged_for_vanishing(layers))
            if config is not None
            else None
        )
        self._actions = {
            "nonfinite": self.on_nonfinite,
            "exploding": self.on_exploding,
            "vanishing": self.on_vanishing,
        }
        enabled = {
            "nonfinite": config is not None,
            "exploding": config is not None and config.detects_exploding,
            "vanishing": config is not None and config.detects_vanishing,
        }
        self.reads_every_step = any(
            enabled[kind] and action != "warn" for kind, action in self._actions.items()
        )
        if self.clipping is not None:
            self.clipping.bind(self.model)

        self.events: list[AnomalyEvent] = []
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.steps = 0  # calls to step()
        self.should_stop = False
        self._consecutive_skips = 0
        self._warned = WarnedLayers()
        self._layout_written = False
        self._clip_at_last_log: tuple[int, Tensor | None] = (0, None)
        # update ratio of a logged step: weights copied at the step, the update's norms
        # measured at the next call, copied to the host with the next logging step's values
        self._snapshot: tuple[int, list[list[Tensor]]] | None = None
        self._pending_update: tuple[int, Tensor] | None = None

    # ------------------------------------------------------------------ public

    def step(self, step: int | None = None) -> GuardStep:
        """Check, clip and log the current gradients; call before ``optimizer.step()``.

        Args:
            step: the step number for logging and events; default: the number of
                previous calls.

        Returns:
            A :class:`GuardStep`: ``should_step``, ``should_stop``, pre/post-clip norms.

        Raises:
            GradientAnomalyError: when an anomaly whose action is ``"raise"`` happened.
        """
        step = self.steps if step is None else int(step)
        self.steps += 1
        self._measure_update()
        with torch.no_grad():
            stats = self._computer()
        logging = step % self.log_every_n_steps == 0

        events: list[AnomalyEvent] = []
        decisions: dict[str, AnomalyEvent] = {}
        if self._detector is not None:
            try:
                self._detector.update(stats, step=step)
                if self.reads_every_step or logging:
                    events, decisions = self._handle(self._detector.read())
            except Exception as err:  # monitoring must never kill training
                _warn_failure("anomaly detection", err)
        if "raise" in decisions:
            raise GradientAnomalyError(decisions["raise"])

        skipped = "skip" in decisions
        if skipped:
            self._skip(stats)
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        should_stop = "stop" in decisions
        if self._consecutive_skips >= self.max_consecutive_skips:
            should_stop = True
            if self._consecutive_skips == self.max_consecutive_skips:
                warnings.warn(
                    f"grad_guard: {self._consecutive_skips} consecutive steps were skipped "
                    f"(max_consecutive_skips={self.max_consecutive_skips}); should_stop is set.",
                    GradientAnomalyWarning,
                    stacklevel=2,
                )
        self.should_stop = self.should_stop or should_stop

        clipped: ClipResult | None = None
        if self.clipping is not None and not skipped:
            clipped = self._clip(stats)

        if logging and self.writer is not None:
            try:
                self._log(step, stats, clipped)
            except Exception as err:
                _warn_failure("logging", err)
        return GuardStep(
            step=step,
            should_step=not skipped,
            should_stop=should_stop,
            pre_clip_norm=stats.total_norm,
            post_clip_norm=clipped.post_norm if clipped is not None else stats.total_norm,
            clip_threshold=clipped.threshold if clipped is not None else None,
            events=events,
            stats=stats,
        )

    def flush(self) -> None:
        """Write what is still pending: the last update ratios and ``"warn"``-only flags.

        Call once after the loop (the writer itself is yours to flush and close).
        """
        self._measure_update()
        if self._pending_update is not None:
            step, both = self._pending_update
            self._pending_update = None
            try:
                self._write_update_ratios(step, both.flatten().cpu().tolist())
            except Exception as err:
                _warn_failure("logging", err)
        if self._detector is not None and self._detector.steps:
            try:
                self._handle(self._detector.read(), act=False)
            except Exception as err:
                _warn_failure("anomaly detection", err)

    def state_dict(self) -> dict[str, Any]:
        """Clipper and detector statistics, counters and events, for a checkpoint."""
        return {
            "steps": self.steps,
            "counts": dict(self.counts),
            "events": [event.to_dict() for event in self.events],
            "consecutive_skips": self._consecutive_skips,
            "clipping": self.clipping.state_dict() if self.clipping is not None else None,
            "detector": self._detector.state_dict() if self._detector is not None else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next step continues where the saved run was."""
        self.steps = int(state_dict.get("steps", 0))
        counts = state_dict.get("counts", {})
        self.counts = {name: int(counts.get(name, 0)) for name in COUNTERS}
        self.events = [AnomalyEvent.from_dict(e) for e in state_dict.get("events", [])]
        self._consecutive_skips = int(state_dict.get("consecutive_skips", 0))
        if self.clipping is not None and state_dict.get("clipping") is not None:
            self.clipping.load_state_dict(state_dict["clipping"])
        if self._detector is not None and state_dict.get("detector") is not None:
            self._detector.load_state_dict(state_dict["detector"])
        if self.clipping is not None:
            self._clip_at_last_log = (self.clipping.steps, self.clipping.clipped_steps)

    # ------------------------------------------------------------------ internals

    def _wanted(self, name: str) -> bool:
        if self._include and not any(p.search(name) for p in self._include):
            return False
        return not any(p.search(name) for p in self._exclude)

    def _handle(
        self, findings: Any, act: bool = True
    ) -> tuple[list[AnomalyEvent], dict[str, AnomalyEvent]]:
        """Count, record and warn; return the new events and the actions due now."""
        events: list[AnomalyEvent] = []
        decisions: dict[str, AnomalyEvent] = {}
        for found in findings.kinds():
            action = self._actions[found.kind]
            self.counts[found.kind] += found.count
            event, warn = self._warned.admit(found, action)
            if event is not None:
                events.append(event)
                if len(self.events) < MAX_EVENTS:
                    self.events.append(event)
                if warn:
                    warnings.warn(
                        f"{event.message()} Try: {event.advice()}.",
                        GradientAnomalyWarning,
                        stacklevel=3,
                    )
            if act and found.now and action != "warn":
                event = event or found.event(action)
                if event is not None:
                    decisions.setdefault(action, event)
        return events, decisions

    def _skip(self, stats: GradientStats) -> None:
        if self.optimizer is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
        else:
            params = [p for layer in self._computer.layers for p in layer.params]
        for param in params:
            param.grad = None
        self.counts["skipped_steps"] += 1

    def _clip(self, stats: GradientStats) -> ClipResult:
        clip = self.clipping
        assert clip is not None
        if clip.norm_type == stats.norm_type:
            return clip.clip_stats(stats)
        # the clipper measures with another p than the logged norms: its own total
        norms = clip.tensor_norms([p.grad for p in stats.params])  # type: ignore[misc]
        total = total_from_layer_norms(norms, clip.norm_type)
        return clip.clip_(stats.grads, total, stats.params, norms)

    def _log(self, step: int, stats: GradientStats, clipped: ClipResult | None) -> None:
        num_layers = len(self.layer_names)
        device = stats.layer_norms.device
        parts = [stats.layer_norms.float(), stats.total_norm.float().reshape(1)]
        if self.log_param_norms:
            parts.append(self._computer.parameter_norms().float().to(device))
        clip_since = None
        if clipped is not None:
            assert self.clipping is not None
            last_steps, last_clipped = self._clip_at_last_log
            now = self.clipping.clipped_steps
            since = now - (last_clipped.to(now.device) if last_clipped is not None else 0)
            clip_since = self.clipping.steps - last_steps
            self._clip_at_last_log = (self.clipping.steps, now)
            parts.append(
                torch.stack([clipped.pre_norm, clipped.post_norm, clipped.threshold, since])
                .float()
                .to(device)
            )
        pending, self._pending_update = self._pending_update, None
        if pending is not None:
            parts.append(pending[1].flatten().to(device))
        values = torch.cat(parts).cpu().tolist()  # the one host copy of a logging step
        if pending is not None:
            self._write_update_ratios(pending[0], values[-2 * num_layers :])

        offset = num_layers + 1
        param_norms = values[offset : offset + num_layers] if self.log_param_norms else None
        logged = [keep and present for keep, present in zip(self._logged, stats.has_grad)]
        metrics = layer_metrics(
            self.layer_names, logged, values[:num_layers], values[num_layers], param_norms
        )
        if self.log_param_norms:
            offset += num_layers
        if clip_since is not None:
            pre, post, threshold, since = values[offset : offset + 4]
            metrics.update(clip_metrics(pre, post, threshold, since / max(clip_since, 1)))
        if self._detector is not None:
            for kind in KINDS:
                metrics[tag(SUMMARY, f"anomalies/{kind}")] = float(self.counts[kind])
            metrics[tag(SUMMARY, "skipped_steps")] = float(self.counts["skipped_steps"])
        self._write_layout()
        self._write(metrics, step)
        if self.log_update_ratio:
            self._snapshot = (
                step,
                [[p.detach().clone() for p in layer.params] for layer in self._computer.layers],
            )

    def _measure_update(self) -> None:
        """Norms of the update the last logged step made, kept on the device until logged."""
        if self._snapshot is None:
            return
        step, before = self._snapshot
        self._snapshot = None
        try:
            with torch.no_grad():
                deltas = [
                    torch._foreach_sub([p.detach() for p in layer.params], old)
                    for layer, old in zip(self._computer.layers, before)
                ]
                both = torch.stack(
                    [self._computer.norms_of(deltas), self._computer.norms_of(before)]
                )
            self._pending_update = (step, both.float())
        except Exception as err:
            _warn_failure("logging", err)

    def _write_update_ratios(self, step: int, values: list[float]) -> None:
        """Log ``||w_after - w_before|| / ||w_before||`` per layer for ``step``."""
        num_layers = len(self.layer_names)
        update_norms, weight_norms = values[:num_layers], values[num_layers:]
        metrics = {
            tag(UPDATE_RATIO, name): update_norms[i] / max(weight_norms[i], 1e-12)
            for i, name in enumerate(self.layer_names)
            if self._logged[i]
        }
        self._write(metrics, step)

    def _write(self, metrics: dict[str, float], step: int) -> None:
        writer = self.writer
        if writer is None or not metrics:
            return
        if write_scalars(writer, metrics, step):
            return
        if callable(getattr(writer, "add_scalar", None)):
            for name, value in metrics.items():
                writer.add_scalar(name, value, global_step=step)
        else:
            writer.log_metrics(metrics, step=step)

    def _write_layout(self) -> None:
        if self._layout_written:
            return
        self._layout_written = True
        writer = self.writer
        if not callable(getattr(writer, "add_custom_scalars", None)):
            return
        charts = monitor_charts(self.log_param_norms, self.log_update_ratio)
        if self.clipping is not None:
            charts.update(clipping_charts())
        if self._detector is not None:
            charts.update(anomaly_charts())
        writer.add_custom_scalars(custom_scalars_layout(charts))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside Fabric, DDP (``.module``) and ``torch.compile`` wrappers.

    Example:
        >>> from torch import nn
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(inner)) is inner
        True
    """
    for _ in range(8):  # wrappers nest (Fabric around DDP around a compiled model)
        name = type(model).__name__
        if name in ("_FabricModule", "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _warn_failure(what: str, err: Exception) -> None:
    warnings.warn(
        f"grad_guard: {what} failed this step and was skipped ({type(err).__name__}: {err}). "
        "Training continues.",
        stacklevel=3,
    )


__all__ = ["GradientGuard", "GuardStep", "unwrap_model"]
