"""What a pass over the gradients found (:class:`GradientStats`), and the p of its norms.

:class:`~grad_guard.core.stats.GradientStatsComputer` makes the passes; this module holds
what they return and what every consumer of a norm shares: :data:`NormType`,
:func:`validate_norm_type` and :func:`total_from_layer_norms` (all re-exported by
:mod:`grad_guard.core.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

NormType = float | Literal["inf"]
"""p of a p-norm: a positive number, or ``"inf"`` (also ``float("inf")``) for the max-norm."""


def validate_norm_type(norm_type: NormType, argument: str = "norm_type") -> float:
    """Return ``norm_type`` as a float: a positive number, ``float("inf")`` or ``"inf"``.

    Args:
        norm_type: the p of the p-norm.
        argument: the argument's name, for the message.

    Raises:
        ValueError: for a bool (``True`` is not ``1.0``), a numeric string (``"2"``), any
            string but ``"inf"`` (``"inf "``), NaN, zero or a negative number.

    Example:
        >>> validate_norm_type("inf"), validate_norm_type(1)
        (inf, 1.0)
        >>> validate_norm_type(True)
        Traceback (most recent call last):
        ...
        ValueError: `norm_type` must be a positive number, float('inf') or 'inf', got True
    """
    from grad_guard._validation import check_norm_type  # the one rule for every p argument

    return check_norm_type(argument, norm_type)


@dataclass
class GradientStats:
    """What one pass over the gradients found. All tensors live on the gradients' device.

    Attributes:
        layer_names: every layer in the pass, forward order.
        has_grad: per layer, whether any of its parameters had a gradient this step
            (known on the host, no sync). Layers without one have norm 0 and are not
            logged or judged.
        layer_norms: ``[L]`` float tensor, the p-norm of each layer's gradient.
        total_norm: scalar tensor, the p-norm over all layers (what
            ``clip_grad_norm_`` would compute for the same parameters).
        nonfinite: ``[L]`` bool tensor, True where a layer's gradient holds NaN/Inf
            (or its norm overflows).
        norm_type: the p of the p-norm.
        grads: the local gradient tensors of the pass (``DTensor`` shards unwrapped),
            ready for in-place ``torch._foreach_mul_`` by a clipper.
        params: the parameters whose gradients are in ``grads``, same order.
        layer_grads: the local gradient tensors grouped per layer (a sequence of lists).
        no_gradients: True when the step had no gradient at all (e.g. ``training_step``
            returned ``None``): nothing to judge or clip, and no statistic should learn
            from the zero norm. Always False for flat shards, where a rank cannot tell
            without a collective.
        grad_counts: per layer, how many local gradients it has (``len`` of each
            ``layer_grads`` entry, known without building them).
    """

    layer_names: tuple[str, ...]
    has_grad: tuple[bool, ...]
    layer_norms: Tensor
    total_norm: Tensor
    nonfinite: Tensor
    norm_type: float
    grads: list[Tensor] = field(default_factory=list, repr=False)
    params: list[Tensor] = field(default_factory=list, repr=False)
    layer_grads: Sequence[list[Tensor]] = field(default_factory=list, repr=False)
    no_gradients: bool = False
    grad_counts: tuple[int, ...] = field(default=(), repr=False)

    @property
    def any_nonfinite(self) -> Tensor:
        """Scalar bool tensor: True when any layer's gradient is non-finite."""
        return self.nonfinite.any()

    def to_dict(self) -> dict[str, float]:
        """Per-layer norms as Python floats, layers with a gradient only.

        This copies to the host (one sync): call it on logging steps only.
        """
        values = self.layer_norms.detach().float().cpu().tolist()
        return {
            name: value
            for name, value, present in zip(self.layer_names, values, self.has_grad)
            if present
        }


def total_from_layer_norms(layer_norms: Tensor, norm_type: float) -> Tensor:
    """Combine per-layer p-norms into the p-norm over everything (no host sync)."""
    if layer_norms.numel() == 0:
        return layer_norms.new_zeros(())
    if math.isinf(norm_type):
        return layer_norms.max()
    return torch.linalg.vector_norm(layer_norms, norm_type)
