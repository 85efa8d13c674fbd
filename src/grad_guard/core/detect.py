"""Vanishing, exploding and non-finite gradient rules, evaluated on the device.

:class:`GradientAnomalyDetector` takes the :class:`~grad_guard.core.stats.GradientStats`
of each optimizer step and updates its statistics and flags with tensor operations only:
no ``.item()``, ``bool()`` or ``.cpu()``. The flags accumulate on the device until
somebody calls :meth:`GradientAnomalyDetector.read`, which packs everything (counts,
layer masks, values, thresholds) into one small tensor and copies it to the host once.
A caller that must act this step (skip, stop, raise) reads every step; one that only
warns reads at logging steps.

The rules:

* **non-finite**: a layer whose gradient holds NaN/Inf. When the step's GradScaler
  found the overflow and will skip the step itself (``16-mixed``), the step is counted
  as an AMP overflow instead, which is normal mixed-precision behaviour.
* **exploding**: the total norm is above ``max_total_norm``, or it is a *spike*: more
  than ``spike_z_threshold`` standard deviations above the mean of the last
  ``spike_window`` finite total norms (armed after ``spike_warmup_steps`` of them), in
  the spirit of OLMo-core's skip-step optimizer. Per-layer exponential moving mean and
  variance name the layers whose own norm spiked. Non-finite norms never enter the
  statistics; a spike enters them clipped to the spike threshold, so one outlier
  cannot inflate the spread and hide the next one, while a lasting change of scale is
  still absorbed within about a window.
* **vanishing**: a layer's norm is below ``vanishing_min_norm``, or below
  ``vanishing_min_ratio`` times the largest layer norm of the same step, for
  ``vanishing_patience`` consecutive steps. Layers without a gradient this step
  (unused, frozen) are not vanishing, and a layer made of a single 1-D tensor (a lone
  bias or norm scale, as ``granularity="parameter"`` gives) is not judged: such
  gradients are legitimately tiny (a bias followed by BatchNorm gets none at all).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from grad_guard.core.layers import group_parameters
    >>> from grad_guard.core.stats import GradientStatsComputer
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    >>> computer = GradientStatsComputer(group_parameters(model))
    >>> detector = GradientAnomalyDetector(computer.layer_names)
    >>> model(torch.ones(2, 4)).sum().backward()
    >>> model[0].weight.grad[0, 0] = float("nan")
    >>> [(e.kind, e.layers, e.origin) for e in detector.check(computer(), step=0)]
    [('nonfinite', ('0',), '0')]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grad_guard._validation import check_float, check_int
from grad_guard.core.events import (
    KINDS,
    AnomalyEvent,
    GradientAnomalyError,
    GradientAnomalyWarning,
)
from grad_guard.core.layers import Layer
from grad_guard.core.stats import GradientStats

__all__ = [
    "AnomalyEvent",
    "DetectionConfig",
    "EMAZScore",
    "Findings",
    "GradientAnomalyDetector",
    "GradientAnomalyError",
    "GradientAnomalyWarning",
    "KindFindings",
    "RollingZScore",
    "WarnedLayers",
    "judged_for_vanishing",
    "vanishing_layers",
]

# A spread below 1% of the mean is treated as 1% of the mean: a perfectly steady norm
# would otherwise turn any wobble into an "infinite" z-score.
REL_STD_FLOOR = 1e-2


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of the three rules, checked at construction.

    Args:
        max_total_norm: absolute limit on the total gradient norm; ``None`` (default)
            for none.
        spike_z_threshold: a total norm more than this many standard deviations above
            the recent mean is a spike; ``None`` turns spike detection off.
        spike_window: how many recent finite total norms the spike statistics use.
        spike_warmup_steps: finite steps seen before spike detection arms (>= 2,
            <= ``spike_window``).
        vanishing_min_norm: a layer norm below this is vanishing; ``None`` (default)
            for no absolute limit.
        vanishing_min_ratio: a layer norm below this fraction of the step's largest
            layer norm is vanishing; ``None`` turns the relative rule off.
        vanishing_patience: consecutive steps a layer must stay below before it is
            reported.

    Raises:
        ValueError: if a value is out of range; the message names the argument.

    Example:
        >>> DetectionConfig(spike_window=10, spike_warmup_steps=20)
        Traceback (most recent call last):
        ...
        ValueError: `spike_warmup_steps` must be <= `spike_window` (10), got 20
    """

    max_total_norm: float | None = None
    spike_z_threshold: float | None = 6.0
    spike_window: int = 128
    spike_warmup_steps: int = 64
    vanishing_min_norm: float | None = None
    vanishing_min_ratio: float | None = 1e-5
    vanishing_patience: int = 10

    def __post_init__(self) -> None:
        # frozen dataclass: store the normalised floats once, at construction
        for name in ("max_total_norm", "spike_z_threshold", "vanishing_min_norm"):
            object.__setattr__(self, name, check_float(name, getattr(self, name), allow_none=True))
        ratio = check_float(
            "vanishing_min_ratio",
            self.vanishing_min_ratio,
            0.0,
            1.0,
            inclusive_max=False,
            allow_none=True,
        )
        object.__setattr__(self, "vanishing_min_ratio", ratio)
        check_int("spike_window", self.spike_window, minimum=2)
        check_int("spike_warmup_steps", self.spike_warmup_steps, minimum=2)
        if self.spike_warmup_steps > self.spike_window:
            raise ValueError(
                f"`spike_warmup_steps` must be <= `spike_window` ({self.spike_window}), "
                f"got {self.spike_warmup_steps!r}"
            )
        check_int("vanishing_patience", self.vanishing_patience, minimum=1)

    @property
    def detects_exploding(self) -> bool:
        return self.max_total_norm is not None or self.spike_z_threshold is not None

    @property
    def detects_vanishing(self) -> bool:
        return self.vanishing_min_norm is not None or self.vanishing_min_ratio is not None


def judged_for_vanishing(layers: Sequence[Layer]) -> list[bool]:
    """Which layers the vanishing rule judges: all but lone 1-D tensors.

    A layer made of a single bias or norm-scale tensor (what ``granularity="parameter"``
    produces) has a legitimately tiny gradient in common architectures: a bias followed
    by BatchNorm gets exactly none. Whole modules (a ``Linear``'s weight and bias, a
    ``BatchNorm``'s scale and shift) are judged.

    Example:
        >>> from torch import nn
        >>> from grad_guard.core.layers import group_parameters
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> judged_for_vanishing(group_parameters(model))
        [True, True]
        >>> judged_for_vanishing(group_parameters(model, "parameter"))
        [True, False, False, False]
    """
    return [len(layer.params) > 1 or any(p.dim() >= 2 for p in layer.params) for layer in layers]


def vanishing_layers(
    layer_norms: Tensor,
    judged: Tensor,
    min_norm: float | None,
    min_ratio: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stateless vanishing rule for one step, on the device.

    Args:
        layer_norms: ``[L]`` gradient norms.
        judged: ``[L]`` bool, layers that have a gradient and may be judged.
        min_norm: absolute limit or ``None``.
        min_ratio: limit relative to the largest norm among the ``judged`` layers, or
            ``None``.

    Returns:
        ``(below [L] bool, threshold scalar, ratio_rule scalar bool)``: the layers below
        the threshold, the threshold used, and whether the relative rule set it.

    Example:
        >>> norms = torch.tensor([1e-9, 0.5, 1.0])
        >>> below, threshold, by_ratio = vanishing_layers(
        ...     norms, torch.tensor([True, True, True]), None, 1e-5)
        >>> below.tolist(), threshold.item(), by_ratio.item()
        ([True, False, False], 9.999999747378752e-06, True)
    """
    zero = layer_norms.new_zeros(())
    largest = torch.where(judged, layer_norms, zero).amax() if layer_norms.numel() else zero
    relative = largest * min_ratio if min_ratio is not None else zero
    absolute = layer_norms.new_full((), min_norm if min_norm is not None else 0.0)
    threshold = torch.maximum(relative, absolute)
    below = judged & (layer_norms < threshold)
    return below, threshold, relative >= absolute


class RollingZScore:
    """Z-score of a scalar against its last ``window`` accepted values, on the device.

    The values sit in a ring buffer; its fill count and write position are device
    tensors too, so accepting or rejecting a value needs no host decision.

    Args:
        window: ring-buffer length.
        z_threshold: a value more than this many standard deviations above the mean is
            a spike.
        warmup_steps: accepted values needed before spikes are reported.

    Example:
        >>> scorer = RollingZScore(window=8, z_threshold=3.0, warmup_steps=4)
        >>> ok = torch.tensor(True)
        >>> [scorer.step(torch.tensor(v), ok)[0].item() for v in (1.0, 1.1, 0.9, 1.0, 50.0)]
        [False, False, False, False, True]
    """

    def __init__(self, window: int, z_threshold: float, warmup_steps: int) -> None:
        self.window = window
        self.z_threshold = z_threshold
        self.warmup_steps = warmup_steps
        self.values: Tensor | None = None
        self.count: Tensor | None = None  # filled entries
        self.position: Tensor | None = None  # next write index

    def _init(self, like: Tensor) -> None:
        self.values = like.new_zeros(self.window)
        self.count = torch.zeros((), dtype=torch.long, device=like.device)
        self.position = torch.zeros((), dtype=torch.long, device=like.device)
        self._slots = torch.arange(self.window, device=like.device)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Mean and (floored) sample standard deviation of the accepted values."""
        assert self.values is not None and self.count is not None
        filled = self._slots < self.count
        n = self.count.clamp(min=1).to(self.values.dtype)
        mean = torch.where(filled, self.values, 0).sum() / n
        var = torch.where(filled, self.values - mean, 0).square().sum() / (n - 1).clamp(min=1)
        return mean, _floored_std(var, mean)

    def threshold(self) -> Tensor:
        """The spike threshold now (``inf`` before warm-up)."""
        mean, std = self.mean_std()
        armed = self.count >= self.warmup_steps
        return torch.where(armed, mean + self.z_threshold * std, math.inf)

    def step(self, value: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Judge ``value`` and, if ``valid``, add it. Returns ``(spike, threshold)``."""
        if self.values is None:
            self._init(value)
        assert self.values is not None and self.position is not None and self.count is not None
        value = value.to(self.values.dtype)
        threshold = self.threshold()
        spike = valid & (value > threshold)
        entering = torch.where(spike, threshold, value)
        slot = self.position.view(1)
        kept = self.values.index_select(0, slot)
        self.values.index_copy_(0, slot, torch.where(valid, entering.view(1), kept))
        accepted = valid.long()
        self.position = (self.position + accepted) % self.window
        self.count = (self.count + accepted).clamp(max=self.window)
        return spike, threshold

    def state_dict(self) -> dict[str, Any]:
        if self.values is None:
            return {}
        return {
            "values": self.values.cpu(),
            "count": self.count.cpu(),
            "position": self.position.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any], like: Tensor) -> None:
        if not state or state["values"].numel() != self.window:
            return
        self._init(like)
        self.values = state["values"].to(device=like.device, dtype=like.dtype)
        self.count = state["count"].to(like.device)
        self.position = state["position"].to(like.device)


class EMAZScore:
    """Per-element z-scores against exponential moving means and variances.

    ``alpha = 2 / (window + 1)`` (the EMA with the same centre of mass as a ``window``
    long average); the variance is bias-corrected for its zero start. Elements enter
    only where ``valid``, spikes enter clipped to their threshold.

    Args:
        size: number of elements (layers).
        window: sets the smoothing, see above.
        z_threshold: z-score above which an element spiked.
        warmup_steps: valid values an element needs before it can spike.

    Example:
        >>> ema = EMAZScore(2, window=8, z_threshold=3.0, warmup_steps=3)
        >>> ok = torch.tensor([True, True])
        >>> for v in ([1.0, 1.0], [1.1, 0.9], [0.9, 1.1], [1.0, 1.0]):
        ...     spiked, z, armed = ema.step(torch.tensor(v), ok)
        >>> ema.step(torch.tensor([1.0, 40.0]), ok)[0].tolist()
        [False, True]
    """

    def __init__(self, size: int, window: int, z_threshold: float, warmup_steps: int) -> None:
        self.size = size
        self.alpha = 2.0 / (window + 1)
        self.z_threshold = z_threshold
        self.warmup_steps = warmup_steps
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.count: Tensor | None = None

    def _init(self, like: Tensor) -> None:
        self.mean = like.new_zeros(self.size)
        self.var = like.new_zeros(self.size)
        self.count = like.new_zeros(self.size)

    def step(self, values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(spiked, z, armed)``, all ``[size]``, judged before the update."""
        if self.mean is None:
            self._init(values)
        assert self.mean is not None and self.var is not None and self.count is not None
        alpha = self.alpha
        correction = 1.0 - (1.0 - alpha) ** (self.count - 1).clamp(min=1.0)
        std = _floored_std(self.var / correction, self.mean)
        safe = torch.where(valid, values, self.mean)  # keeps NaN out of the arithmetic
        z = (safe - self.mean) / std
        armed = self.count >= self.warmup_steps
        spiked = armed & valid & (z > self.z_threshold)
        entering = torch.where(spiked, self.mean + self.z_threshold * std, safe)
        first = self.count == 0
        diff = entering - self.mean
        increment = alpha * diff
        new_mean = torch.where(first, entering, self.mean + increment)
        new_var = torch.where(first, 0.0, (1.0 - alpha) * (self.var + diff * increment))
        self.mean = torch.where(valid, new_mean, self.mean)
        self.var = torch.where(valid, new_var, self.var)
        self.count = self.count + valid.to(self.count.dtype)
        return spiked, z, armed

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None:
            return {}
        return {"mean": self.mean.cpu(), "var": self.var.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any], like: Tensor) -> None:
        if not state or state["mean"].numel() != self.size:
            return
        self.mean = state["mean"].to(device=like.device, dtype=like.dtype)
        self.var = state["var"].to(device=like.device, dtype=like.dtype)
        self.count = state["count"].to(device=like.device, dtype=like.dtype)


def _floored_std(var: Tensor, mean: Tensor) -> Tensor:
    floor = torch.clamp(mean.abs() * REL_STD_FLOOR, min=torch.finfo(var.dtype).tiny)
    return torch.maximum(var.clamp(min=0).sqrt(), floor)


@dataclass(frozen=True)
class KindFindings:
    """What one rule found since the last read (host values).

    Attributes:
        kind: ``"nonfinite"``, ``"exploding"`` or ``"vanishing"``.
        count: steps on which it fired.
        first_step: the first of those steps (``None`` if it did not fire).
        now: whether it fired on the latest step (what an immediate action acts on).
        layers: every layer involved since the last read, forward order.
        values: each layer's gradient norm the last time it was involved.
        active: the layers involved on the latest step.
        threshold: the threshold the last time it fired.
        rule: which rule fired the last time.
    """

    kind: str
    count: int
    first_step: int | None
    now: bool
    layers: tuple[str, ...]
    values: tuple[float, ...]
    active: tuple[str, ...]
    threshold: float | None
    rule: str
    total_norm: float | None = None

    def event(self, action: str) -> AnomalyEvent | None:
        """The :class:`AnomalyEvent` for these findings, or ``None`` if nothing fired."""
        if not self.count:
            return None
        return AnomalyEvent(
            step=self.first_step if self.first_step is not None else -1,
            kind=self.kind,
            layers=self.layers,
            values=self.values,
            threshold=self.threshold,
            action=action,
            rule=self.rule,
            origin=self.layers[-1] if self.kind == "nonfinite" and self.layers else None,
            total_norm=self.total_norm,
            occurrences=self.count,
        )


@dataclass(frozen=True)
class Findings:
    """Everything :meth:`GradientAnomalyDetector.read` found, per rule.

    Attributes:
        nonfinite, exploding, vanishing: the :class:`KindFindings` of each rule.
        amp_overflows: steps the GradScaler will skip because of an overflow.
        amp_now: whether the latest step is one of them.
        updates: steps covered by this read.
    """

    nonfinite: KindFindings
    exploding: KindFindings
    vanishing: KindFindings
    amp_overflows: int
    amp_now: bool
    updates: int

    def kinds(self) -> tuple[KindFindings, KindFindings, KindFindings]:
        return (self.nonfinite, self.exploding, self.vanishing)


# packed layout: scalars, then three [3, L] blocks
_NONFINITE, _EXPLODING, _VANISHING = range(3)
_S_COUNT, _S_AGE, _S_NOW, _S_THRESHOLD = 0, 3, 6, 9  # each followed by one slot per kind
_S_AMP_COUNT, _S_AMP_NOW, _S_TOTAL, _S_SPIKE_RULE, _S_RATIO_RULE = range(12, 17)
_SCALARS = 17
_NAN_CODE = -1.0  # norms are >= 0; NaN is encoded so the MAX all-reduce stays defined


class WarnedLayers:
    """Rate limit for events and warnings: once per layer and kind until it recovers.

    Shared by the Lightning callback and the plain-loop guard, so both report the same
    events.

    Example:
        >>> gate = WarnedLayers()
        >>> gate.layers
        {'nonfinite': set(), 'exploding': set(), 'vanishing': set()}
    """

    def __init__(self) -> None:
        self.layers: dict[str, set[str]] = {kind: set() for kind in KINDS}

    def admit(self, found: KindFindings, action: str) -> tuple[AnomalyEvent | None, bool]:
        """The event to record for ``found`` (``None`` if nothing new) and whether to warn.

        A lasting vanishing condition is one event until a new layer joins it; a warning
        is due only for layers not warned about since they last recovered.
        """
        warned = self.layers[found.kind]
        new_layers = [name for name in found.layers if name not in warned]
        self.layers[found.kind] = (warned | set(found.layers)) & set(found.active)
        event = found.event(action)
        if event is None or (found.kind == "vanishing" and not new_layers):
            return None, False
        return event, bool(new_layers) and action != "raise"

    def state_dict(self) -> dict[str, list[str]]:
        return {kind: sorted(names) for kind, names in self.layers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers = {kind: set(state.get(kind, ())) for kind in KINDS}


class GradientAnomalyDetector:
    """Stateful anomaly rules over a fixed list of layers, kept on the device.

    Call :meth:`update` once per optimizer step (no host sync), and :meth:`read` when
    the host needs to know (one small device-to-host copy, which also clears the
    accumulated flags). :meth:`check` does both.

    Args:
        layer_names: the layers, in forward order (as in ``GradientStats.layer_names``).
        config: the thresholds; default :class:`DetectionConfig()`.
        vanishing_judged: per layer, whether the vanishing rule judges it (see
            :func:`judged_for_vanishing`); default all.

    Raises:
        ValueError: if ``vanishing_judged`` does not have one entry per layer.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        config: DetectionConfig | None = None,
        vanishing_judged: Sequence[bool] | None = None,
    ) -> None:
        self.layer_names = tuple(layer_names)
        self.config = config if config is not None else DetectionConfig()
        num_layers = len(self.layer_names)
        if vanishing_judged is not None and len(vanishing_judged) != num_layers:
            raise ValueError(
                f"`vanishing_judged` must have one entry per layer ({num_layers}), "
                f"got {len(vanishing_judged)}"
            )
        self._judged_host = (
            [True] * num_layers if vanishing_judged is None else [bool(j) for j in vanishing_judged]
        )
        c = self.config
        self._total: RollingZScore | None = None
        self._layers: EMAZScore | None = None
        if c.spike_z_threshold is not None:
            self._total = RollingZScore(c.spike_window, c.spike_z_threshold, c.spike_warmup_steps)
            self._layers = EMAZScore(
                num_layers, c.spike_window, c.spike_z_threshold, c.spike_warmup_steps
            )
        self._ready = False
        self._loaded_state: dict[str, Any] | None = None
        self._present_masks: dict[tuple[bool, ...], Tensor] = {}
        self.steps: list[int] = []  # steps covered by the pending flags
        self.updates = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    # ---------------------------------------------------------------- device side

    def _init(self, like: Tensor) -> None:
        device, dtype = like.device, like.dtype
        num_layers = self.num_layers
        self._dtype = dtype
        self._device = device
        self._judged = torch.tensor(self._judged_host, dtype=torch.bool, device=device)
        self._slots = torch.arange(num_layers, device=device)
        self._streak = torch.zeros(num_layers, dtype=torch.long, device=device)
        self._scalars = torch.zeros(_SCALARS, dtype=dtype, device=device)
        self._layers_any = torch.zeros(3, num_layers, dtype=torch.bool, device=device)
        self._layers_now = torch.zeros(3, num_layers, dtype=torch.bool, device=device)
        self._values = torch.zeros(3, num_layers, dtype=dtype, device=device)
        self._ready = True
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self._apply_state(state, like)

    def _present_mask(self, has_grad: tuple[bool, ...]) -> Tensor:
        # a cache per pattern: building a device tensor from a list blocks on CUDA, and
        # MoE / stochastic-depth models alternate between a few patterns
        mask = self._present_masks.get(has_grad)
        if mask is None:
            if len(self._present_masks) >= 16:
                self._present_masks.clear()
            mask = torch.tensor(has_grad, dtype=torch.bool, device=self._device)
            self._present_masks[has_grad] = mask
        return mask

    def update(
        self, stats: GradientStats, step: int | None = None, amp_overflow: Tensor | None = None
    ) -> None:
        """Judge one optimizer step's statistics and accumulate the flags on the device.

        Args:
            stats: the step's gradient statistics (same layers as ``layer_names``).
            step: the step number recorded in events (default: updates so far).
            amp_overflow: scalar bool tensor, True when a GradScaler found Inf/NaN and
                will skip this step itself; ``None`` without a scaler.

        Raises:
            ValueError: if ``stats`` has a different number of layers.
        """
        if stats.no_gradients:  # nothing was measured; a zero norm is not a data point
            return
        if len(stats.layer_names) != self.num_layers:
            raise ValueError(
                f"`stats` has {len(stats.layer_names)} layers, the detector {self.num_layers}"
            )
        self.steps.append(self.updates if step is None else int(step))
        self.updates += 1
        if self.num_layers == 0:
            return
        norms = stats.layer_norms.detach()
        if not self._ready:
            self._init(norms if norms.is_floating_point() else norms.float())
        c = self.config
        norms = norms.to(device=self._device, dtype=self._dtype)
        total = stats.total_norm.detach().to(device=self._device, dtype=self._dtype)
        present = self._present_mask(stats.has_grad)
        false = torch.zeros((), dtype=torch.bool, device=self._device)
        zero = norms.new_zeros(())

        nonfinite = stats.nonfinite.to(self._device) & present
        any_nonfinite = nonfinite.any()
        amp = false if amp_overflow is None else amp_overflow.to(self._device).reshape(()).bool()
        nonfinite_now = any_nonfinite & ~amp
        finite_step = ~(any_nonfinite | amp)
        valid_layers = present & finite_step

        # exploding
        exploding_now, threshold, by_spike = false, norms.new_full((), math.inf), false
        if c.max_total_norm is not None:
            exploding_now = finite_step & (total > c.max_total_norm)
            threshold = norms.new_full((), c.max_total_norm)
        if self._total is not None and self._layers is not None:
            by_spike, spike_threshold = self._total.step(total, finite_step)
            spiked, z, armed = self._layers.step(norms, valid_layers)
            exploding_now = exploding_now | by_spike
            threshold = torch.minimum(threshold, spike_threshold)
            scored = armed & valid_layers
            score = torch.where(
                scored.any(),
                torch.where(scored, z, -math.inf),
                torch.where(valid_layers, norms, -math.inf),
            )
            top = self._slots == score.argmax()
            exploding_layers = torch.where(spiked.any(), spiked, top) & exploding_now
        else:
            top = self._slots == torch.where(valid_layers, norms, -math.inf).argmax()
            exploding_layers = top & exploding_now

        # vanishing
        vanishing_layers_now, vanishing_threshold, by_ratio = (
            torch.zeros_like(present),
            zero,
            false,
        )
        if c.detects_vanishing:
            below, vanishing_threshold, by_ratio = vanishing_layers(
                norms, present & self._judged, c.vanishing_min_norm, c.vanishing_min_ratio
            )
            self._streak = torch.where(
                finite_step, torch.where(below, self._streak + 1, 0), self._streak
            )
            vanishing_layers_now = finite_step & (self._streak >= c.vanishing_patience)
        vanishing_now = vanishing_layers_now.any()

        # accumulate until the next read
        now = torch.stack([nonfinite_now, exploding_now, vanishing_now])
        s = self._scalars
        s[_S_COUNT : _S_COUNT + 3] += now
        age = s[_S_AGE : _S_AGE + 3]
        s[_S_AGE : _S_AGE + 3] = torch.where(age > 0, age + 1, now.to(self._dtype))
        s[_S_NOW : _S_NOW + 3] = now.to(self._dtype)
        thresholds = torch.stack([zero, threshold, vanishing_threshold])
        s[_S_THRESHOLD : _S_THRESHOLD + 3] = torch.where(
            now, thresholds, s[_S_THRESHOLD : _S_THRESHOLD + 3]
        )
        s[_S_AMP_COUNT] += amp
        s[_S_AMP_NOW] = amp.to(self._dtype)
        s[_S_TOTAL] = torch.where(exploding_now, total, s[_S_TOTAL])
        s[_S_SPIKE_RULE] = torch.where(exploding_now, by_spike.to(self._dtype), s[_S_SPIKE_RULE])
        s[_S_RATIO_RULE] = torch.where(vanishing_now, by_ratio.to(self._dtype), s[_S_RATIO_RULE])

        layers_now = torch.stack(
            [nonfinite & nonfinite_now, exploding_layers, vanishing_layers_now]
        )
        self._layers_any |= layers_now
        self._layers_now = layers_now
        encoded = torch.where(torch.isnan(norms), _NAN_CODE, norms)
        values_now = torch.stack([encoded, norms, norms])
        self._values = torch.where(layers_now, values_now, self._values)

    # ------------------------------------------------------------------ host side

    def pack(self) -> Tensor:
        """The pending flags, counts, values and thresholds in one device tensor.

        Every entry is either a flag, a count or a non-negative value, so the packed
        tensors of several ranks combine with an element-wise MAX.
        """
        if not self._ready:
            return torch.zeros(_SCALARS + 9 * self.num_layers)
        return torch.cat(
            [
                self._scalars,
                self._layers_any.flatten().to(self._dtype),
                self._layers_now.flatten().to(self._dtype),
                self._values.flatten(),
            ]
        )

    def decode(self, values: Sequence[float]) -> Findings:
        """Turn :meth:`pack`'s output, copied to the host, into :class:`Findings`."""
        num_layers = self.num_layers
        scalars = values[:_SCALARS]
        blocks = values[_SCALARS:]
        steps = self.steps or [self.updates - 1]
        kinds = []
        for k, kind in enumerate(KINDS):
            row_any = blocks[k * num_layers : (k + 1) * num_layers]
            row_now = blocks[(3 + k) * num_layers : (4 + k) * num_layers]
            row_values = blocks[(6 + k) * num_layers : (7 + k) * num_layers]
            count = round(scalars[_S_COUNT + k])
            age = round(scalars[_S_AGE + k])
            first = steps[max(0, len(steps) - age)] if count and age else None
            chosen = [i for i, flag in enumerate(row_any) if flag > 0.5]
            layer_values = tuple(
                math.nan if row_values[i] == _NAN_CODE else float(row_values[i]) for i in chosen
            )
            if kind == "nonfinite":
                rule, threshold, total = "nonfinite", None, None
            elif kind == "exploding":
                rule = "spike" if scalars[_S_SPIKE_RULE] > 0.5 else "max_total_norm"
                threshold, total = float(scalars[_S_THRESHOLD + k]), float(scalars[_S_TOTAL])
            else:
                rule = "min_ratio" if scalars[_S_RATIO_RULE] > 0.5 else "min_norm"
                threshold, total = float(scalars[_S_THRESHOLD + k]), None
            kinds.append(
                KindFindings(
                    kind=kind,
                    count=count,
                    first_step=first,
                    now=scalars[_S_NOW + k] > 0.5,
                    layers=tuple(self.layer_names[i] for i in chosen),
                    values=layer_values,
                    active=tuple(
                        self.layer_names[i] for i, flag in enumerate(row_now) if flag > 0.5
                    ),
                    threshold=threshold if count else None,
                    rule=rule if count else "",
                    total_norm=total if count else None,
                )
            )
        return Findings(
            nonfinite=kinds[0],
            exploding=kinds[1],
            vanishing=kinds[2],
            amp_overflows=round(scalars[_S_AMP_COUNT]),
            amp_now=scalars[_S_AMP_NOW] > 0.5,
            updates=len(self.steps),
        )

    def clear_pending(self) -> None:
        """Forget the accumulated flags (the running statistics stay)."""
        self.steps = []
        if self._ready:
            self._scalars.zero_()
            self._layers_any.zero_()
            self._layers_now.zero_()
            self._values.zero_()

    def read(self, reduce: Callable[[Tensor], Tensor] | None = None) -> Findings:
        """Copy the pending flags to the host (one transfer), decode and clear them.

        Args:
            reduce: applied to the packed tensor before the copy, e.g. an all-reduce
                with MAX so that every rank sees the same findings.
        """
        packed = self.pack()
        if reduce is not None:
            packed = reduce(packed)
        findings = self.decode(packed.cpu().tolist())
        self.clear_pending()
        return findings

    def check(
        self, stats: GradientStats, step: int | None = None, amp_overflow: Tensor | None = None
    ) -> list[AnomalyEvent]:
        """:meth:`update` then :meth:`read`: the events of this step (action ``"none"``)."""
        self.update(stats, step, amp_overflow)
        findings = self.read()
        return [e for k in findings.kinds() if (e := k.event("none")) is not None]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Running statistics (spike window, per-layer EMAs, vanishing streaks), on CPU."""
        state: dict[str, Any] = {"layer_names": list(self.layer_names), "updates": self.updates}
        if self._ready:
            state["streak"] = self._streak.cpu()
            if self._total is not None and self._layers is not None:
                state["total"] = self._total.state_dict()
                state["layers"] = self._layers.state_dict()
        elif self._loaded_state is not None:
            state = dict(self._loaded_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ignored when the layers differ."""
        if list(state.get("layer_names", [])) != list(self.layer_names):
            return
        self.updates = int(state.get("updates", 0))
        if self._ready:
            self._apply_state(state, self._scalars)
        else:
            self._loaded_state = dict(state)

    def _apply_state(self, state: dict[str, Any], like: Tensor) -> None:
        if "streak" in state and state["streak"].numel() == self.num_layers:
            self._streak = state["streak"].to(self._device)
        if self._total is not None and self._layers is not None:
            self._total.load_state_dict(state.get("total", {}), like)
            self._layers.load_state_dict(state.get("layers", {}), like)
