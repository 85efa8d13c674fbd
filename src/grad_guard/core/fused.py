"""Fold clipping and skipping into a fused optimizer's own kernel: no extra pass, no sync.

The fused ``Adam``, ``AdamW`` and ``SGD`` kernels (``fused=True``, CPU and CUDA) read two
optional tensors from the optimizer: ``grad_scale`` (the gradients are divided by it
inside the kernel) and ``found_inf`` (when nonzero the kernel leaves the weights, the
optimizer state and the step count untouched). ``torch.amp.GradScaler`` sets both just
before it calls ``step()`` and deletes them after. This module does the same for
grad_guard's clipping coefficient ``c`` and skip flag:

* ``grad_scale <- grad_scale / c`` (``1 / c`` without a scaler): the kernel then unscales
  and clips in the one read of the gradients it makes anyway;
* ``found_inf <- found_inf + skip``: a skipped step is dropped by the kernel itself.

Both are applied in an optimizer step *pre-hook*, which runs inside ``step()`` after a
GradScaler has set its own values, so the two compose. Nothing here reads a device
value on the host.

Folding is right only when nothing after grad_guard needs the clipped gradients
(Lightning's ``gradient_clip_val``, another callback's hook, a user hook): then the
caller multiplies instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch  # noqa: F401  (the examples use it)
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["FusedFold", "is_fused"]


def is_fused(optimizer: Any) -> bool:
    """Whether ``optimizer`` applies ``grad_scale`` / ``found_inf`` inside its kernel.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> is_fused(torch.optim.AdamW([w], fused=True)), is_fused(torch.optim.AdamW([w]))
        (True, False)
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and isinstance(
        optimizer, Optimizer
    )


class FusedFold:
    """Pending coefficient and skip flag of one fused optimizer, applied inside ``step()``.

    Args:
        optimizer: a fused optimizer (see :func:`is_fused`).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> optimizer = torch.optim.SGD([w], lr=1.0, fused=True)
        >>> fold = FusedFold(optimizer)
        >>> w.grad = torch.full((2,), 4.0)
        >>> fold.set(coefficient=torch.tensor(0.25), skip=torch.tensor(False))
        >>> optimizer.step()
        >>> w.detach()  # 1 - lr * 4 * 0.25
        tensor([0., 0.])
        >>> w.grad = torch.full((2,), 4.0)
        >>> fold.set(coefficient=None, skip=torch.tensor(True))
        >>> optimizer.step()
        >>> w.detach()  # the kernel skipped the step
        tensor([0., 0.])
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self._optimizer = weakref.ref(optimizer)
        self._coefficient: Tensor | None = None
        self._skip: Tensor | None = None
        self._added: tuple[bool, bool] = (False, False)
        self._handles = (
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        )

    def set(self, coefficient: Tensor | None, skip: Tensor | None) -> None:
        """What the next ``step()`` applies: a clip factor and/or a skip flag (tensors)."""
        self._coefficient, self._skip = coefficient, skip

    def remove(self) -> None:
        """Unhook from the optimizer."""
        for handle in self._handles:
            handle.remove()

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        coefficient, skip = self._coefficient, self._skip
        self._coefficient = self._skip = None
        added_scale = added_inf = False
        if coefficient is not None:
            scale = getattr(optimizer, "grad_scale", None)
            coefficient = coefficient.detach().float()
            # the kernel divides by grad_scale: dividing the scale by c multiplies by c
            if scale is None:
                optimizer.grad_scale = coefficient.reciprocal()  # type: ignore[attr-defined]
                added_scale = True
            else:
                optimizer.grad_scale = scale / coefficient.to(scale)  # type: ignore[attr-defined]
        if skip is not None:
            found = getattr(optimizer, "found_inf", None)
            flag = skip.detach().float()
            if found is None:
                optimizer.found_inf = flag  # type: ignore[attr-defined]
                added_inf = True
            else:
                optimizer.found_inf = found + flag.to(found)  # type: ignore[attr-defined]
        self._added = (added_scale, added_inf)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # leave no attribute behind that a non-fused code path would trip over; a
        # GradScaler deletes its own after step() returns
        added_scale, added_inf = self._added
        self._added = (False, False)
        if added_scale and hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale  # type: ignore[attr-defined]
        if added_inf and hasattr(optimizer, "found_inf"):
            del optimizer.found_inf  # type: ignore[attr-defined]
