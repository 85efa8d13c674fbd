"""``AutoClip``: clip to a percentile of the recent gradient norms (Seetharaman et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from grad_guard._validation import check_float, check_int
from grad_guard.core.clip.base import ClipAlgorithm, ClipResult, norm_coefficient
from grad_guard.core.stats import validate_norm_type


def nan_percentile(values: Tensor, percentile: float) -> Tensor:
    """The ``percentile`` (0-100) of the non-NaN entries of a 1-D tensor, on its device.

    Linear interpolation between the two nearest ranks (NumPy's default). NaN when every
    entry is NaN. No host sync: the number of valid entries stays a tensor.

    Example:
        >>> nan_percentile(torch.tensor([4.0, float("nan"), 1.0, 2.0, 3.0]), 50.0)
        tensor(2.5000)
    """
    ordered = torch.sort(values).values  # NaN sorts last
    count = (~torch.isnan(ordered)).sum()
    rank = (count - 1).clamp(min=0).to(values.dtype) * (percentile / 100.0)
    low = rank.floor().long().view(1)
    high = (low + 1).clamp(max=values.numel() - 1)
    a, b = ordered.gather(0, low), ordered.gather(0, high)
    fraction = rank - rank.floor()
    value = torch.where(fraction > 0, a + (b - a) * fraction, a)[0]
    return torch.where(count > 0, value, torch.full_like(value, float("nan")))


class AutoClip(ClipAlgorithm):
    r"""Clip the gradient norm to a percentile of the norms seen so far.

    AutoClip (Seetharaman et al., 2020, "AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks"): each step the current total norm joins the history, then the
    gradients are clipped (as ``clip_grad_norm_`` does) to the ``percentile``-th
    percentile of that history. With the default 10th percentile most steps are
    clipped a little, which is the intended effect: the step size adapts to the
    typical gradient norm.

    The history is a ring buffer of the last ``window`` finite norms, kept on the
    gradients' device (the original keeps an unbounded Python list and calls
    ``.item()`` every step). On the first step the history holds only the current norm,
    so the threshold equals it and nothing is clipped; until ``window`` norms are seen
    the percentile is over those there are. Non-finite norms are not recorded and
    their gradients are left untouched.

    Args:
        percentile: which percentile of the history is the threshold, in (0, 100].
        window: how many recent norms the history keeps (>= 1).
        norm_type: p of the total norm (``2.0`` by default).

    Raises:
        ValueError: if an argument is out of range; the message names it.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> clip = AutoClip(percentile=50.0)
        >>> for g in (1.0, 3.0, 2.0):
        ...     w.grad = torch.tensor([g])
        ...     _ = clip([w])
        >>> clip.last.threshold, w.grad  # median of (1, 3, 2); 2 is not above it
        (tensor(2.), tensor([2.]))
    """

    def __init__(
        self, percentile: float = 10.0, window: int = 1000, norm_type: float | str = 2.0
    ) -> None:
        super().__init__()
        self.percentile = check_float("percentile", percentile, 0.0, 100.0)
        self.window = check_int("window", window)
        self.norm_type = validate_norm_type(norm_type)
        self.history = torch.full((self.window,), float("nan"))
        self.position = torch.zeros((), dtype=torch.long)
        self.count = torch.zeros((), dtype=torch.long)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        self._follow(total_norm)
        finite = torch.isfinite(total_norm)
        slot = self.position.view(1)
        kept = self.history.gather(0, slot)
        # out of place: the engine's steps make their tensors under inference_mode
        self.history = self.history.index_copy(0, slot, torch.where(finite, total_norm.view(1), kept))
        self.position = torch.where(finite, (self.position + 1) % self.window, self.position)
        self.count = self.count + finite.long()
        threshold = nan_percentile(self.history, self.percentile)
        coefficient, clipped = norm_coefficient(total_norm, threshold)
        self._scale_(grads, coefficient)
        return ClipResult(total_norm, total_norm * coefficient, threshold, clipped)

    def _follow(self, norm: Tensor) -> None:
        """Keep the statistics on the norm's device and dtype (set once, then a no-op)."""
        if self.history.device != norm.device or self.history.dtype != norm.dtype:
            self.history = self.history.to(norm)
            self.position = self.position.to(norm.device)
            self.count = self.count.to(norm.device)

    def _state(self) -> dict[str, Tensor]:
        return {"history": self.history, "position": self.position, "count": self.count}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        history = state["history"]
        if history.shape != (self.window,):
            raise ValueError(
                f"AutoClip state has a history of {tuple(history.shape)} norms but this "
                f"AutoClip has `window`={self.window}; build it with the same window"
            )
        self.history = history
        self.position = state["position"].long()
        self.count = state["count"].long()

    def _arguments(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window, "norm_type": self.norm_type}
