"""The exploding rule: the total norm over an absolute limit and/or a z-score spike of its
recent history, blamed on the layers whose own norm spiked."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.detect.config import DetectionConfig
from grad_guard.core.detect.zscore import EMAZScore, RollingZScore


class ExplodingRule:
    """The exploding rule of one optimizer's layers, kept on the device.

    Args:
        num_layers: the number of layers.
        config: ``max_total_norm`` and the ``spike_*`` settings are used.

    Example:
        >>> rule = ExplodingRule(2, DetectionConfig(max_total_norm=10.0, spike_z_threshold=None))
        >>> ok = torch.tensor(True)
        >>> fired, threshold, by_spike, layers = rule.step(
        ...     torch.tensor(20.0), torch.tensor([1.0, 19.0]), ok, ok)
        >>> fired.item(), threshold.item(), by_spike.item(), layers.tolist()
        (True, 10.0, False, [False, True])
    """

    def __init__(self, num_layers: int, config: DetectionConfig) -> None:
        c = config
        self.num_layers = num_layers
        self.max_total_norm = c.max_total_norm
        #: the spike statistics: a rolling window of the total norm, EMAs per layer
        self.total: RollingZScore | None = None
        self.layers: EMAZScore | None = None
        if c.spike_z_threshold is not None:
            self.total = RollingZScore(c.spike_window, c.spike_z_threshold, c.spike_warmup_steps)
            self.layers = EMAZScore(
                num_layers, c.spike_window, c.spike_z_threshold, c.spike_warmup_steps
            )
        self._ready = False

    def _init(self, like: Tensor) -> None:
        device, dtype = like.device, like.dtype
        self._slots = torch.arange(self.num_layers, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._inf = torch.full((), math.inf, dtype=dtype, device=device)
        self._neg_inf = -self._inf
        limit = self.max_total_norm
        self._limit = None if limit is None else torch.full((), limit, dtype=dtype, device=device)
        self._ready = True

    def step(
        self, total: Tensor, norms: Tensor, finite_step: Tensor, valid_layers: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Judge one step (and take its norms into the statistics).

        Args:
            total: the total norm (scalar).
            norms: ``[L]`` layer norms.
            finite_step: scalar bool, the step is finite (only finite steps are judged).
            valid_layers: ``[L]`` (or scalar) bool, layers with a finite gradient.

        Returns:
            ``(fired, threshold, by_spike, layers)``: scalar bool, the threshold in force,
            scalar bool "the spike rule fired", ``[L]`` bool layers to blame.
        """
        if not self._ready:
            self._init(norms)
        fired, threshold, by_spike = self._false, self._inf, self._false
        if self._limit is not None:
            fired = finite_step & (total > self._limit)
            threshold = self._limit
        if self.total is None or self.layers is None:
            top = self._slots == torch.where(valid_layers, norms, self._neg_inf).argmax()
            return fired, threshold, by_spike, top & fired
        by_spike, spike_threshold = self.total.step(total, finite_step)
        spiked, z, armed = self.layers.step(norms, valid_layers)
        if self._limit is None:
            fired, threshold = by_spike, spike_threshold
        else:
            fired = fired | by_spike
            threshold = torch.minimum(threshold, spike_threshold)
        # blame the layers that spiked; else the most unusual (or largest) one
        scored = armed & valid_layers
        score = torch.where(
            scored.any(),
            torch.where(scored, z, self._neg_inf),
            torch.where(valid_layers, norms, self._neg_inf),
        )
        top = self._slots == score.argmax()
        return fired, threshold, by_spike, torch.where(spiked.any(), spiked, top) & fired

    def state_dict(self) -> dict[str, Any]:
        """The spike statistics (``{}`` without the spike rule)."""
        if self.total is None or self.layers is None:
            return {}
        return {"total": self.total.state_dict(), "layers": self.layers.state_dict()}

    def load_state_dict(self, state: dict[str, Any], like: Tensor) -> None:
        if self.total is not None and self.layers is not None:
            self.total.load_state_dict(state.get("total", {}), like)
            self.layers.load_state_dict(state.get("layers", {}), like)
