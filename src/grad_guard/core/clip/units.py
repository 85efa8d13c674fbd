"""How AGC splits a parameter into units, and the norm of each unit.

A unit is one output row of a ``Linear`` or ``Embedding``, one filter of a ``Conv``, one
output channel of a ``ConvTranspose`` (per group when ``groups > 1``); 1-D and 0-D
tensors are one unit each. :func:`unit_layout` reads the units off a model's layer
types; :func:`unitwise_norm` measures them; :func:`reduce_cut_units` completes the unit
norms of a ``DTensor`` whose sharding cuts its units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grad_guard.core.layers import compile_patterns
from grad_guard.core.norm_plan import LOW_PRECISION

try:  # torch.distributed is optional (some builds ship without it)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class Unit:
    """How AGC splits one parameter into units.

    Attributes:
        name: the parameter's qualified name (``""`` when unknown).
        dim: the axis that indexes the units (output features/filters), or ``None`` when
            the whole tensor is one unit (biases, norm gains, scalars).
        groups: for grouped ``ConvTranspose``: units are (group, output channel) pairs.
        excluded: left alone (the output head, or matched by ``exclude``).
    """

    name: str = ""
    dim: int | None = 0
    groups: int = 1
    excluded: bool = False


def default_unit(param: Tensor, name: str = "") -> Unit:
    """Rows for tensors with >= 2 dims (Linear, Conv, Embedding), whole tensor otherwise."""
    return Unit(name=name, dim=0 if param.ndim >= 2 else None)


def unit_layout(
    module: nn.Module, exclude_head: bool = True, exclude: str | Sequence[str] | None = None
) -> dict[int, Unit]:
    """``{id(parameter): Unit}`` for every trainable parameter of ``module``.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 2, 3), nn.Linear(2, 2))
        >>> layout = unit_layout(model)
        >>> [(u.name, u.dim, u.excluded) for u in layout.values()]  # doctest: +NORMALIZE_WHITESPACE
        [('0.weight', 0, False), ('0.bias', None, False), ('1.weight', 1, False),
         ('1.bias', None, False), ('2.weight', 0, True), ('2.bias', None, True)]
    """
    patterns = compile_patterns("exclude", exclude)
    owners: list[tuple[str, nn.Module, list[tuple[str, Tensor]]]] = []
    seen: set[int] = set()
    head = None
    for path, sub in module.named_modules(remove_duplicate=False):
        own = []
        for pname, param in sub.named_parameters(recurse=False):
            if param.ndim >= 2:
                head = path
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            own.append((f"{path}.{pname}" if path else pname, param))
        if own:
            owners.append((path, sub, own))
    layout: dict[int, Unit] = {}
    for path, sub, own in owners:
        transposed = isinstance(sub, nn.modules.conv._ConvTransposeNd)
        for name, param in own:
            excluded = (exclude_head and path == head) or any(p.search(name) for p in patterns)
            if param.ndim < 2:
                unit = Unit(name, None, 1, excluded)
            elif transposed:
                unit = Unit(name, 1, int(sub.groups), excluded)  # type: ignore[arg-type]
            else:
                unit = Unit(name, 0, 1, excluded)
            layout[id(param)] = unit
    return layout


def _unit_view(x: Tensor, unit: Unit) -> tuple[Tensor, tuple[int, ...]]:
    """``(view, dims to reduce)``: the unit norm is the norm of ``view`` over ``dims``."""
    if unit.groups > 1:
        # ConvTranspose weight (in, out/g, *k): output channel j of group k reads input
        # channels k*in/g .. (k+1)*in/g - 1 only
        view = x.unflatten(0, (unit.groups, -1))
        return view, tuple(d for d in range(view.ndim) if d not in (0, 2))
    dim = unit.dim if unit.dim is not None else 0
    return x, tuple(d for d in range(x.ndim) if d != dim)


def unitwise_norm(x: Tensor, unit: Unit) -> Tensor:
    """Norm of each unit of ``x``, shaped to broadcast against ``x`` (or its grouped view).

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), Unit(dim=0)).flatten()
        tensor([5., 1.])
    """
    dtype = torch.float32 if x.dtype in LOW_PRECISION else None
    if unit.dim is None or x.ndim < 2:
        return torch.linalg.vector_norm(x, dtype=dtype)
    view, dims = _unit_view(x, unit)
    return torch.linalg.vector_norm(view, dim=dims, keepdim=True, dtype=dtype)


def reduce_cut_units(
    param: Tensor, unit: Unit, g_norm: Tensor, w_norm: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum the squared unit norms over the shards that cut the units (DTensor only)."""
    grad = param.grad
    if DTensor is None or not isinstance(grad, DTensor):
        return g_norm, w_norm
    placements = grad.placements
    if any(isinstance(pl, Partial) for pl in placements):
        raise RuntimeError(
            f"grad_guard: AGC cannot clip {unit.name or 'a parameter'!r}: its gradient has a "
            "pending (Partial) reduction"
        )
    cut = [m for m, pl in enumerate(placements) if isinstance(pl, Shard) and pl.dim != unit.dim]
    if not cut:
        return g_norm, w_norm
    if unit.groups > 1:
        raise RuntimeError(
            f"grad_guard: AGC cannot clip the grouped ConvTranspose weight "
            f"{unit.name or ''!r} sharded as {placements}: its units span shards. Exclude it "
            "(`AGC(exclude=...)`) or do not shard it."
        )
    both = torch.stack([g_norm.square(), w_norm.square()])
    mesh = grad.device_mesh
    for mesh_dim in cut:
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=mesh.get_group(mesh_dim))
    return both[0].sqrt(), both[1].sqrt()
