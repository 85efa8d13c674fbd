"""Z-scores kept on the device: a rolling window for scalars, EMAs for per-layer values.

The same statistics serve the exploding rule (total norm), the loss-spike rule (loss)
and the per-layer attribution of a spike. Everything is a tensor, so judging a value
and taking it in never asks the host anything.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# A spread below 1% of the mean is treated as 1% of the mean: a perfectly steady norm
# would otherwise turn any wobble into an "infinite" z-score.
REL_STD_FLOOR = 1e-2
_TINY = {dtype: torch.finfo(dtype).tiny for dtype in (torch.float32, torch.float64)}


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
        self._inf = like.new_full((), math.inf)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Mean and (floored) sample standard deviation of the accepted values."""
        assert self.values is not None and self.count is not None
        # slots not yet filled hold 0 (they are written in order), so they add nothing
        n = self.count.to(self.values.dtype)
        mean = self.values.sum() / n.clamp(min=1)
        deviation = (self.values - mean) * (self._slots < self.count)
        var = torch.dot(deviation, deviation) / (n - 1).clamp(min=1)
        return mean, _floored_std(var, mean)

    def threshold(self) -> Tensor:
        """The spike threshold now (``inf`` before warm-up)."""
        mean, std = self.mean_std()
        armed = self.count >= self.warmup_steps
        return torch.where(armed, torch.add(mean, std, alpha=self.z_threshold), self._inf)

    def step(self, value: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Judge ``value`` and, if ``valid``, add it. Returns ``(spike, threshold)``."""
        if self.values is None:
            self._init(value)
        assert self.values is not None and self.position is not None and self.count is not None
        if value.dtype != self.values.dtype:
            value = value.to(self.values.dtype)
        threshold = self.threshold()
        spike = valid & (value > threshold)
        entering = torch.where(spike, threshold, value)
        write = valid & (self._slots == self.position)
        self.values = torch.where(write, entering, self.values)
        self.position = (self.position + valid) % self.window
        self.count = (self.count + valid).clamp(max=self.window)
        return spike, threshold

    def state_dict(self) -> dict[str, Any]:
        if self.values is None:
            return {}
        return {
            "values": self.values.cpu().clone(),
            "count": self.count.cpu().clone(),
            "position": self.position.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], like: Tensor) -> None:
        if not state or state["values"].numel() != self.window:
            return
        self._init(like)
        self.count = state["count"].to(like.device)
        self.position = state["position"].to(like.device)
        values = state["values"].to(device=like.device, dtype=like.dtype)
        self.values = torch.where(self._slots < self.count, values, 0)  # unfilled slots: 0


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
        self._zero = like.new_zeros(())

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
        spiked = armed & (z > self.z_threshold)  # z is 0 where not valid
        entering = torch.where(spiked, torch.add(self.mean, std, alpha=self.z_threshold), safe)
        first = self.count == 0
        diff = entering - self.mean  # 0 where not valid: the mean stays as it is
        increment = alpha * diff
        self.mean = torch.where(first, entering, self.mean + increment)
        new_var = (1.0 - alpha) * torch.addcmul(self.var, diff, increment)
        new_var = torch.where(first, self._zero, new_var)
        self.var = torch.where(valid, new_var, self.var)
        self.count = self.count + valid
        return spiked, z, armed

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None:
            return {}
        return {
            "mean": self.mean.cpu().clone(),
            "var": self.var.cpu().clone(),
            "count": self.count.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any], like: Tensor) -> None:
        if not state or state["mean"].numel() != self.size:
            return
        self._zero = like.new_zeros(())
        self.mean = state["mean"].to(device=like.device, dtype=like.dtype)
        self.var = state["var"].to(device=like.device, dtype=like.dtype)
        self.count = state["count"].to(device=like.device, dtype=like.dtype)


def _floored_std(var: Tensor, mean: Tensor) -> Tensor:
    # var >= 0 by construction (sums of squares, EMAs of them), so no clamp before sqrt
    tiny = _TINY.get(var.dtype) or torch.finfo(var.dtype).tiny
    floor = torch.clamp(mean.abs() * REL_STD_FLOOR, min=tiny)
    return torch.maximum(var.sqrt(), floor)
