"""``ValueClip``: clamp every gradient element to ``[-clip_value, clip_value]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support

from grad_guard._validation import check_float
from grad_guard.core.clip.base import ClipAlgorithm, ClipResult, state_tensor
from grad_guard.core.stats import validate_norm_type


class ValueClip(ClipAlgorithm):
    r"""Clamp each gradient element to ``[-clip_value, clip_value]``.

    The same rule as ``torch.nn.utils.clip_grad_value_`` and Lightning's
    ``gradient_clip_algorithm="value"``. Unlike norm clipping it changes the direction
    of the gradient. It costs more than ``NormClip``: besides the clamp it reads the
    gradients twice more, once for the largest element (whether anything was clipped)
    and once for the post-clip norm. NaN elements stay NaN.

    Args:
        clip_value: the bound, > 0.
        norm_type: p of the pre/post-clip norms it reports (``2.0`` by default).

    Raises:
        ValueError: if ``clip_value`` is not a positive number.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> w.grad = torch.tensor([-3.0, 0.5, 2.0])
        >>> ValueClip(clip_value=1.0)([w])
        tensor(3.6401)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """

    def __init__(self, clip_value: float, norm_type: float | str = 2.0) -> None:
        super().__init__()
        self.clip_value = check_float("clip_value", clip_value)
        self.norm_type = validate_norm_type(norm_type)

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        # the full (DTensor) gradients, so that both norms are over all shards
        full = grads if params is None else [p.grad for p in params]
        threshold = state_tensor(self.clip_value, total_norm)
        clipped = (self._largest(full) > self.clip_value).to(total_norm.device)  # type: ignore[arg-type]
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), members in groups.items():
            if _has_foreach_support(members, device):
                torch._foreach_clamp_min_(members, -self.clip_value)
                torch._foreach_clamp_max_(members, self.clip_value)
            else:
                for grad in members:
                    grad.clamp_(-self.clip_value, self.clip_value)
        post = self.norm_computer(1, self.norm_type)([full])[0].to(total_norm)  # type: ignore[list-item]
        return ClipResult(total_norm, post, threshold, clipped)

    def _largest(self, grads: list[Tensor]) -> Tensor:
        """The largest ``|element|`` over all gradients (over all shards for ``DTensor``)."""
        if self.process_group is not None or any(type(g) is not Tensor for g in grads):
            return self.norm_computer(1, float("inf"))([grads])[0]  # type: ignore[list-item]
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for grad in grads:
            if grad.numel() and not grad.is_sparse:
                groups.setdefault((grad.device, grad.dtype), []).append(grad)
        if not groups:
            return torch.zeros(())
        first = next(iter(groups))[0]
        largest: list[Tensor] = []
        for (device, _), members in groups.items():
            if device.type == "cpu":
                # the CPU inf-norm kernel is ~10x slower than a min/max pass
                for grad in members:
                    low, high = torch.aminmax(grad)
                    largest.append(torch.maximum(-low, high).float())
            else:
                largest.extend(n.float() for n in torch._foreach_norm(members, float("inf")))
        return torch.stack([x.to(first) for x in largest]).max()

    def _arguments(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value, "norm_type": self.norm_type}
