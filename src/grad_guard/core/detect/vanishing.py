"""The vanishing rule: which layers are judged, and which fall below the limit this step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grad_guard.core.layers import Layer


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
    if min_ratio is None:  # the absolute limit alone
        threshold = layer_norms.new_full((), min_norm if min_norm is not None else 0.0)
        return judged & (layer_norms < threshold), threshold, threshold < 0
    if layer_norms.numel():
        largest = torch.where(judged, layer_norms, 0.0).amax()
    else:
        largest = layer_norms.new_zeros(())
    relative = largest * min_ratio
    if min_norm is None:
        # norms are >= 0, so the relative limit is the threshold (as max(relative, 0));
        # a NaN largest norm (a non-finite step, never judged) gives no ratio rule
        threshold = relative
        by_ratio = relative >= 0
    else:
        absolute = layer_norms.new_full((), min_norm)
        threshold = torch.maximum(relative, absolute)
        by_ratio = relative >= absolute
    return judged & (layer_norms < threshold), threshold, by_ratio
