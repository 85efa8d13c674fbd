"""``ZClip``: clip gradient-norm spikes by their z-score against an EMA (Kumar et al. 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from grad_guard._validation import check_choice, check_float, check_int
from grad_guard.core.clip.base import ClipAlgorithm, ClipResult, norm_coefficient
from grad_guard.core.stats import validate_norm_type

ClipOption = Literal["adaptive_scaling", "mean"]


class ZClip(ClipAlgorithm):
    r"""Clip the total gradient norm when it is a statistical outlier of its recent history.

    ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"):

    1. **Warm-up.** The first ``warmup_steps`` finite norms are only collected (nothing
       is clipped except by ``max_norm``); then the mean :math:`\mu` and the (population)
       variance :math:`\sigma^2` of those norms start two exponential moving averages.
    2. **Detection.** Each later norm :math:`g` gets the z-score
       :math:`z = (g - \mu) / (\sigma + \epsilon)`. A spike is :math:`z > z_{thres}`.
    3. **Clipping.** A spike is scaled down to the norm
       :math:`\mu + z^{*}\sigma` with the reciprocal rule
       :math:`z^{*} = z_{thres}^2 / z` (``clip_option="adaptive_scaling"``): the larger
       the spike, the harder it is cut. ``clip_option="mean"`` clips spikes to
       :math:`\mu` instead.
    4. **Update.** The EMAs then take in the norm the step ends with (the clipped value
       for a spike, so one spike does not inflate the statistics):
       :math:`\mu \leftarrow \alpha\mu + (1-\alpha)v`,
       :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(v - \mu)^2` with the
       updated :math:`\mu`, as the reference implementation does.

    An optional hard cap ``max_norm`` (off by default) also clips any norm above it,
    during the warm-up too; it does not change what the EMAs take in. A NaN or infinite
    norm is neither clipped nor recorded: the statistics keep their last good state.

    Everything stays on the gradients' device: the warm-up buffer, the EMAs and the
    decision to clip are tensors, so a step makes no host-device sync (the reference
    implementation calls ``.item()`` every step).

    The threshold reported in :class:`ClipResult` is the largest norm the step allows:
    :math:`\mu + z_{thres}(\sigma + \epsilon)` on an ordinary step, the clip target on a
    spike, ``inf`` during the warm-up (or ``max_norm`` when set).

    Args:
        alpha: EMA smoothing factor in (0, 1); the statistics remember about
            ``1 / (1 - alpha)`` steps.
        z_threshold: z-score above which a norm is a spike, > 0.
        warmup_steps: finite norms collected before the EMAs start, >= 1.
        clip_option: ``"adaptive_scaling"`` (reciprocal rule) or ``"mean"``.
        max_norm: optional fixed cap on the total norm, > 0; ``None`` (default) for none.
        eps: added to :math:`\sigma` in the z-score, > 0.
        norm_type: p of the total norm (``2.0`` by default).

    Raises:
        ValueError: if an argument is out of range; the message names it.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> clip = ZClip(warmup_steps=4)
        >>> for g in (1.0, 2.0, 1.0, 2.0, 9.0):  # warm-up: mean 1.5, std 0.5
        ...     w.grad = torch.tensor([g])
        ...     _ = clip([w])
        >>> clip.last.clipped.item(), round(w.grad.item(), 4)  # z = 15 -> 1.5 + 2.5**2/15*0.5
        (True, 1.7083)
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        clip_option: ClipOption = "adaptive_scaling",
        max_norm: float | None = None,
        eps: float = 1e-6,
        norm_type: float | str = 2.0,
    ) -> None:
        super().__init__()
        self.alpha = check_float("alpha", alpha, 0.0, 1.0, inclusive_max=False)
        self.z_threshold = check_float("z_threshold", z_threshold)
        self.warmup_steps = check_int("warmup_steps", warmup_steps)
        self.clip_option = check_choice("clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.max_norm = check_float("max_norm", max_norm, allow_none=True)
        self.eps = check_float("eps", eps)
        self.norm_type = validate_norm_type(norm_type)
        self.warmup = torch.full((self.warmup_steps,), float("nan"))
        self.count = torch.zeros((), dtype=torch.long)
        self.mean = torch.zeros(())
        self.var = torch.zeros(())
        self._slots: Tensor | None = None  # warm-up buffer positions
        self._inf = torch.full((), math.inf)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        self._follow(total_norm)
        g = total_norm
        finite = g < math.inf  # a norm is >= 0: NaN and inf are the non-finite ones
        ready = self.count >= self.warmup_steps
        std = self.var.clamp(min=0).sqrt()
        spread = std + self.eps
        z = (g - self.mean) / spread
        spike = ready & finite & (z > self.z_threshold)
        if self.clip_option == "mean":
            target = self.mean
        else:
            target = torch.addcdiv(self.mean, std, z, value=self.z_threshold**2)
        ordinary = torch.add(self.mean, spread, alpha=self.z_threshold)
        threshold = torch.where(ready, torch.where(spike, target, ordinary), self._inf)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        coefficient, clipped = norm_coefficient(g, threshold, finite)
        self._scale_(grads, coefficient)

        # statistics: EMA after the warm-up, with the clipped value of a spike
        value = torch.where(spike, target, g)
        mean = torch.add(self.mean * self.alpha, value, alpha=1 - self.alpha)
        deviation = value - mean
        var = torch.addcmul(self.var * self.alpha, deviation, deviation, value=1 - self.alpha)
        update = ready & finite
        # warm-up: collect, then start the EMAs from the sample mean and variance
        collect = finite & ~ready
        self.warmup = torch.where(collect & (self._slots == self.count), g, self.warmup)
        start = collect & (self.count == self.warmup_steps - 1)
        first_var, first_mean = torch.var_mean(self.warmup, correction=0)
        self.mean = torch.where(start, first_mean, torch.where(update, mean, self.mean))
        self.var = torch.where(start, first_var, torch.where(update, var, self.var))
        self.count = self.count + finite
        return ClipResult(g, g * coefficient, threshold, clipped)

    @property
    def std(self) -> Tensor:
        """The EMA standard deviation of the norm (a tensor)."""
        return self.var.clamp(min=0).sqrt()

    def _follow(self, norm: Tensor) -> None:
        """Keep the statistics on the norm's device and dtype (set once, then a no-op)."""
        if self.mean.device != norm.device or self.mean.dtype != norm.dtype:
            self.warmup = self.warmup.to(norm)
            self.mean = self.mean.to(norm)
            self.var = self.var.to(norm)
            self.count = self.count.to(norm.device)
        if self._slots is None or self._slots.device != norm.device:
            self._slots = torch.arange(self.warmup_steps, device=norm.device)
        inf = self.__dict__.get("_inf")  # absent in a ZClip pickled by grad_guard 0.1
        if inf is None or inf.device != norm.device or inf.dtype != norm.dtype:
            self._inf = torch.full((), math.inf, dtype=norm.dtype, device=norm.device)

    def _state(self) -> dict[str, Tensor]:
        return {"warmup": self.warmup, "count": self.count, "mean": self.mean, "var": self.var}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        warmup = state["warmup"]
        if warmup.shape != (self.warmup_steps,):
            raise ValueError(
                f"ZClip state has a warm-up buffer of {tuple(warmup.shape)} norms but this "
                f"ZClip has `warmup_steps`={self.warmup_steps}; build it with the same value"
            )
        self.warmup = warmup
        self.count = state["count"].long()
        self.mean = state["mean"]
        self.var = state["var"]

    def _arguments(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "warmup_steps": self.warmup_steps,
            "clip_option": self.clip_option,
            "max_norm": self.max_norm,
            "eps": self.eps,
            "norm_type": self.norm_type,
        }
