"""What one clipping step did (:class:`ClipResult`) and the coefficient that clips a norm.

The coefficient ``threshold / (norm + NORM_EPS)`` stays a device tensor: whether to clip
is decided elementwise with ``torch.where``, never by asking the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Added to the norm in the coefficient ``threshold / (norm + EPS)``, as torch does.
NORM_EPS = 1e-6


@dataclass
class ClipResult:
    """What one clipping step did. Every field is a scalar tensor on the gradients' device.

    Attributes:
        pre_norm: total p-norm of the gradients before clipping.
        post_norm: total p-norm after clipping.
        threshold: the bound in force this step: a total norm for ``NormClip``,
            ``AutoClip`` and ``ZClip`` (``inf`` while nothing can be clipped, e.g. during
            ZClip's warm-up), the per-element bound for ``ValueClip``, the ratio
            ``clip_factor`` for ``AGC`` (each unit has its own bound).
        clipped: bool, whether any gradient was changed.
        coefficient: the one factor the gradients are still to be multiplied by, when
            :meth:`ClipAlgorithm.clip_` was asked not to apply it (``apply=False``) and
            the algorithm scales all gradients alike; ``None`` when the gradients were
            scaled in place. The step engine applies it itself (folded into a fused
            optimizer, or multiplied in after its host read): do not apply it again.
    """

    pre_norm: Tensor
    post_norm: Tensor
    threshold: Tensor
    clipped: Tensor
    coefficient: Tensor | None = None


def norm_coefficient(
    norm: Tensor, threshold: Tensor, finite: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(coefficient, clipped)`` that bring a total ``norm`` down to ``threshold``.

    ``coefficient`` is ``threshold / (norm + 1e-6)`` where ``norm > threshold`` and 1
    elsewhere, including where ``norm`` is NaN or infinite (such gradients are left for
    the anomaly detector or the GradScaler to drop). Works elementwise on vectors too.
    ``finite`` is ``torch.isfinite(norm)`` when the caller has it already.

    Example:
        >>> norm_coefficient(torch.tensor([4.0, 1.0, float("nan")]), torch.tensor(2.0))[1]
        tensor([ True, False, False])
    """
    if finite is None:
        finite = torch.isfinite(norm)
    clipped = finite & (norm > threshold)
    coefficient = torch.where(clipped, threshold / (norm + NORM_EPS), 1.0)
    return coefficient, clipped


def state_tensor(value: float, like: Tensor) -> Tensor:
    """A scalar with ``like``'s device and dtype (a constant threshold, say)."""
    return torch.full((), value, device=like.device, dtype=like.dtype)
