"""Gradients scaled in place, and per-tensor norms, one foreach call per (device, dtype).

Both follow ``torch.nn.utils.clip_grad_norm_``: the tensors are grouped by device and
dtype, each group is one ``torch._foreach_mul_`` or ``torch._foreach_norm``, and tensors
the foreach kernels do not take (sparse ones, ``DTensor``) go one by one or to
:class:`~grad_guard.core.stats.LayerNormComputer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils._foreach_utils import _has_foreach_support

from grad_guard.core.norm_plan import LOW_PRECISION, ForeachList


def scale_grads_(grads: Sequence[Tensor], coefficients: Tensor | Sequence[Tensor]) -> None:
    """Multiply ``grads`` in place by one coefficient, or by one per gradient.

    Grouped by (device, dtype) so that each group is one ``torch._foreach_mul_`` call;
    the coefficient is always multiplied in, also when it is 1, because asking whether
    it is 1 would cost a host-device sync.

    Args:
        grads: the (local) gradient tensors.
        coefficients: a scalar tensor, or a sequence of tensors broadcastable to each
            gradient.

    Example:
        >>> grads = [torch.ones(2), torch.ones(3)]
        >>> scale_grads_(grads, torch.tensor(0.5))
        >>> grads[1]
        tensor([0.5000, 0.5000, 0.5000])
    """
    per_tensor = not isinstance(coefficients, Tensor)
    if isinstance(grads, ForeachList) and not per_tensor:
        if grads:  # one dense foreach group, known from the statistics pass
            torch._foreach_mul_(grads, coefficients.to(grads[0].device))  # type: ignore[union-attr]
        return
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for i, grad in enumerate(grads):
        members, coefs = groups.setdefault((grad.device, grad.dtype), ([], []))
        members.append(grad)
        if per_tensor:
            coefs.append(coefficients[i])  # type: ignore[index]
    for (device, _), (members, coefs) in groups.items():
        if per_tensor:
            other: Tensor | list[Tensor] = [c.to(device) for c in coefs]
        else:
            other = coefficients.to(device)  # type: ignore[union-attr]
        if _has_foreach_support(members, device) and not any(g.is_sparse for g in members):
            torch._foreach_mul_(members, other)
        else:
            for j, grad in enumerate(members):
                grad.mul_(other[j] if per_tensor else other)  # type: ignore[index]


def _plain_foreach_group(tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` are dense, not ``DTensor``, on one device with one dtype."""
    first = tensors[0]
    if type(first) is not Tensor and type(first) is not nn.Parameter:
        return False
    device, dtype = first.device, first.dtype
    for t in tensors:
        if (type(t) is not Tensor and type(t) is not nn.Parameter) or t.is_sparse:
            return False
        if t.device != device or t.dtype != dtype:
            return False
    return _has_foreach_support(list(tensors), device)


def plain_norms(tensors: Sequence[Tensor], norm_type: float = 2.0) -> Tensor | None:
    """``[len(tensors)]`` norms in one ``torch._foreach_norm`` when the tensors allow it.

    That is: plain dense tensors (no ``DTensor``) on one device, with one dtype. Returns
    ``None`` otherwise (then :class:`~grad_guard.core.stats.LayerNormComputer` does it).

    Example:
        >>> plain_norms([torch.tensor([3.0, 4.0]), torch.ones(4)])
        tensor([5., 2.])
        >>> plain_norms([torch.ones(2), torch.ones(2, dtype=torch.float64)]) is None
        True
    """
    if not tensors or not _plain_foreach_group(tensors):
        return None
    # low-precision norms overflow early (fp16 max is 65504): accumulate in float32
    dtype = torch.float32 if tensors[0].dtype in LOW_PRECISION else None
    return torch.stack(torch._foreach_norm(list(tensors), norm_type, dtype=dtype))
