"""``GradientAnomalyDetector``: the rules of one optimizer's layers, kept on the device.

:meth:`GradientAnomalyDetector.update` judges one step with tensor operations only; the
flags accumulate on the device until :meth:`GradientAnomalyDetector.pack` puts them in one
small tensor that the caller copies to the host (with whatever else it reports that
step) and :meth:`GradientAnomalyDetector.decode` turns into :class:`Findings`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.detect.config import DetectionConfig
from grad_guard.core.detect.decode import decode_findings
from grad_guard.core.detect.exploding import ExplodingRule
from grad_guard.core.detect.findings import Findings, packed_size
from grad_guard.core.detect.pending import PendingFindings
from grad_guard.core.detect.vanishing import vanishing_layers
from grad_guard.core.detect.zscore import RollingZScore
from grad_guard.core.stats import GradientStats


class GradientAnomalyDetector:
    """Stateful anomaly rules over a fixed list of layers, kept on the device.

    Call :meth:`update` once per optimizer step (no host sync); :meth:`read` (or
    :meth:`pack` + :meth:`decode`) when the host needs to know, which also clears the
    accumulated flags. :meth:`check` does both.

    Args:
        layer_names: the layers, in forward order (as in ``GradientStats.layer_names``).
        config: the thresholds; default :class:`DetectionConfig()`.
        vanishing_judged: per layer, whether the vanishing rule judges it (see
            :func:`~grad_guard.core.detect.vanishing.judged_for_vanishing`); default all.

    Raises:
        ValueError: if ``vanishing_judged`` does not have one entry per layer.

    Example:
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
        self._exploding = ExplodingRule(num_layers, c)
        self._loss: RollingZScore | None = None
        if c.loss_z_threshold is not None:
            self._loss = RollingZScore(c.loss_window, c.loss_z_threshold, c.loss_warmup_steps)
        self._ready = False
        self._loaded_state: dict[str, Any] | None = None
        self._present_masks: dict[tuple[bool, ...], Tensor] = {}
        self.steps: list[int] = []  # steps covered by the pending flags
        self.updates = 0
        #: ``[NUM_KINDS]`` float device tensor (0/1): which rules fired on the latest update
        self.now: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    # ---------------------------------------------------------------- device side

    def _init(self, like: Tensor) -> None:
        device, dtype = like.device, like.dtype
        num_layers = self.num_layers
        self._dtype, self._device = dtype, device
        self._judged = torch.tensor(self._judged_host, dtype=torch.bool, device=device)
        self._streak = torch.zeros(num_layers, dtype=torch.long, device=device)
        self._pending = PendingFindings(num_layers, dtype, device)
        self._no_layers = torch.zeros(num_layers, dtype=torch.bool, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._ready = True
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            self._apply_state(state, like)

    def _masks(self, has_grad: tuple[bool, ...]) -> tuple[Tensor | None, Tensor]:
        """``(present or None when all are, judged)`` device masks of a pattern, cached: a
        list to a device tensor blocks on CUDA; MoE models alternate a few patterns."""
        masks = self._present_masks.get(has_grad)
        if masks is None:
            if len(self._present_masks) >= 16:
                self._present_masks.clear()
            if all(has_grad):
                masks = (None, self._judged)
            else:
                present = torch.tensor(has_grad, dtype=torch.bool, device=self._device)
                masks = (present, present & self._judged)
            self._present_masks[has_grad] = masks
        return masks

    def update(
        self,
        stats: GradientStats,
        step: int | None = None,
        amp_overflow: Tensor | None = None,
        loss: Tensor | None = None,
    ) -> None:
        """Judge one optimizer step and accumulate the flags on the device.

        Args:
            stats: the step's gradient statistics (same layers as ``layer_names``).
            step: the step number recorded in events (default: updates so far).
            amp_overflow: scalar bool tensor, True when a GradScaler found Inf/NaN and
                will skip this step itself; ``None`` without a scaler.
            loss: the step's training loss (scalar tensor) for the loss rule, or ``None``.

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
        norms = _plain(stats.layer_norms)
        if not self._ready:
            self._init(norms if norms.is_floating_point() else norms.float())
        c = self.config
        norms = self._here(norms)
        total = self._here(_plain(stats.total_norm))
        present, judged = self._masks(stats.has_grad)
        false, zero = self._false, self._zero

        nonfinite = stats.nonfinite.to(self._device)  # no op when it is there
        if present is not None:
            nonfinite = nonfinite & present
        any_nonfinite = nonfinite.any()
        amp = None
        if amp_overflow is None:
            nonfinite_now, finite_step = any_nonfinite, ~any_nonfinite
        else:
            amp = amp_overflow.to(self._device).reshape(()).bool()
            nonfinite_now = any_nonfinite & ~amp
            finite_step = ~(any_nonfinite | amp)
            nonfinite = nonfinite & nonfinite_now
        # a 0-d flag broadcasts like the [L] mask it stands for
        valid_layers = finite_step if present is None else present & finite_step

        # exploding: absolute limit and/or a z-score spike of the total norm
        exploding_now, threshold, by_spike, exploding_layers = self._exploding.step(
            total, norms, finite_step, valid_layers
        )

        # vanishing: below the limit for `vanishing_patience` finite steps in a row
        vanishing_now_layers, vanishing_threshold, by_ratio = self._no_layers, zero, false
        if c.detects_vanishing:
            below, vanishing_threshold, by_ratio = vanishing_layers(
                norms, judged, c.vanishing_min_norm, c.vanishing_min_ratio
            )
            self._streak = torch.where(finite_step, (self._streak + 1) * below, self._streak)
            vanishing_now_layers = finite_step & (self._streak >= c.vanishing_patience)

        # loss: non-finite, or a z-score spike
        loss_now, loss_threshold, loss_value, loss_by_spike = false, zero, zero, false
        if loss is not None:
            loss_value = self._here(_plain(loss)).reshape(())
            loss_finite = torch.isfinite(loss_value)
            loss_now = ~loss_finite
            if self._loss is not None:
                loss_by_spike, loss_threshold = self._loss.step(loss_value, loss_finite)
                loss_now = loss_now | loss_by_spike
            loss_value = torch.nan_to_num(loss_value, nan=math.inf)

        self._pending.add(
            (nonfinite_now, exploding_now, vanishing_now_layers.any(), loss_now),
            (zero, threshold, vanishing_threshold, loss_threshold),
            amp,
            (total, by_spike, by_ratio, loss_value, loss_by_spike),
            (nonfinite, exploding_layers, vanishing_now_layers),
            norms,
        )
        self.now = self._pending.now

    def _here(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the detector's device, in its dtype (no op when it already is)."""
        if tensor.device != self._device or tensor.dtype != self._dtype:
            return tensor.to(device=self._device, dtype=self._dtype)
        return tensor

    # ------------------------------------------------------------------ host side

    def pack(self) -> Tensor:
        """The pending flags, counts, values and thresholds in one device tensor.

        Every entry is a flag, a count or a non-negative value (NaN encoded), so the
        packed tensors of several ranks combine with an element-wise MAX.
        """
        if not self._ready:
            return torch.zeros(packed_size(self.num_layers))
        return self._pending.pack()

    def decode(self, values: Sequence[float]) -> Findings:
        """Turn :meth:`pack`'s output, copied to the host, into :class:`Findings`."""
        steps = self.steps or [self.updates - 1]
        return decode_findings(values, self.layer_names, steps, len(self.steps))

    def clear_pending(self) -> None:
        """Forget the accumulated flags (the running statistics stay)."""
        self.steps = []
        if self._ready:
            self._pending.clear()

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
        self,
        stats: GradientStats,
        step: int | None = None,
        amp_overflow: Tensor | None = None,
        loss: Tensor | None = None,
    ) -> list[Any]:
        """:meth:`update` then :meth:`read`: the events of this step (action ``"none"``)."""
        self.update(stats, step, amp_overflow, loss)
        return [e for k in self.read().kinds() if (e := k.event("none")) is not None]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Running statistics (spike windows, per-layer EMAs, vanishing streaks), on CPU."""
        state: dict[str, Any] = {"layer_names": list(self.layer_names), "updates": self.updates}
        if self._ready:
            state["streak"] = self._streak.cpu().clone()  # a copy, never the live tensor
            state.update(self._exploding.state_dict())
            if self._loss is not None:
                state["loss"] = self._loss.state_dict()
        elif self._loaded_state is not None:
            state = dict(self._loaded_state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; ignored when the layers differ."""
        if list(state.get("layer_names", [])) != list(self.layer_names):
            return
        self.updates = int(state.get("updates", 0))
        if self._ready:
            self._apply_state(state, self._zero)
        else:
            self._loaded_state = dict(state)

    def _apply_state(self, state: dict[str, Any], like: Tensor) -> None:
        if "streak" in state and state["streak"].numel() == self.num_layers:
            self._streak = state["streak"].to(self._device)
        self._exploding.load_state_dict(state, like)
        if self._loss is not None:
            self._loss.load_state_dict(state.get("loss", {}), like)


def _plain(tensor: Tensor) -> Tensor:
    """``tensor`` without autograd history (no op when it has none, as under no_grad)."""
    return tensor.detach() if tensor.requires_grad else tensor
