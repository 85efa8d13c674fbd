"""Per-layer norms of arbitrary tensors, sharded ones included: the general path.

:class:`~grad_guard.core.stats.GradientStatsComputer` plans the common case (complete,
dense, plain tensors, see :mod:`grad_guard.core.norm_plan`); everything else comes here.

Sharded gradients (``DTensor``, as FSDP2 produces) are reduced to the norms of the full,
unsharded gradient: local ``|g|^p`` sums for *all* layers are packed into one vector and
all-reduced once per process group. Replicated placements (tensor parallel) are not
summed again, so nothing is double counted.

FSDP1 gives plain tensors that are each rank's slice of a flat parameter. Given the
``process_group`` the slices are spread over, their ``|g|^p`` sums are packed and
all-reduced the same way (one collective for all layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support

from grad_guard._validation import check_norm_type
from grad_guard.core.norm_plan import LOW_PRECISION

try:  # torch.distributed is optional (some builds ship without it)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

_FLAT_SHARDS = "flat_shards"  # reduce key of plain tensors sharded over `process_group`


class LayerNormComputer:
    """Per-layer p-norms of many tensors in one foreach pass, with cached index tensors.

    The same machinery serves gradients, parameters and parameter updates.

    Args:
        num_layers: how many layers the result has.
        norm_type: p of the p-norm (``float('inf')`` for the max-norm).
        process_group: when given, plain (non-``DTensor``) tensors are taken to be this
            rank's shards of tensors split over the group (FSDP1 flat parameters): their
            ``|g|^p`` sums are all-reduced over it, in one collective that every rank makes
            on every call, also when it holds no shard. ``None`` (default): plain tensors
            are complete.
        device: where the result lives when a call gets no tensor at all (a rank that
            holds no shard still takes part in the all-reduce).

    Example:
        >>> computer = LayerNormComputer(num_layers=2)
        >>> computer([[torch.ones(4)], [torch.ones(9), torch.zeros(3)]])
        tensor([2., 3.])
    """

    def __init__(
        self,
        num_layers: int,
        norm_type: float = 2.0,
        process_group: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.process_group = process_group
        self.device = device
        self._index_cache: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}
        self.collectives_last_call = 0

    def __call__(
        self,
        tensors_per_layer: Sequence[Sequence[Tensor]],
        names_per_layer: Sequence[Sequence[str]] | None = None,
    ) -> Tensor:
        """Return the ``[num_layers]`` tensor of per-layer norms of ``tensors_per_layer``."""
        # (reduce key, device, dtype) -> (local tensors, their layer indices)
        groups: dict[tuple, tuple[list[Tensor], list[int]]] = {}
        # every reduce key met, empty shards included, in the order met: the same on every
        # rank, so that every rank makes the same collectives in the same order
        reduce_keys: dict[object, None] = {}
        if self.process_group is not None:
            reduce_keys[_FLAT_SHARDS] = None  # joined even by a rank that holds no slice
        dtypes: set[torch.dtype] = set()
        device = None
        for layer_index, tensors in enumerate(tensors_per_layer):
            for tensor in tensors:
                reduce_key, local = self._localize(tensor)
                if local.is_sparse:
                    # the norm of a sparse tensor is that of its (summed) values
                    local = local.coalesce()._values()
                reduce_keys.setdefault(reduce_key, None)
                dtypes.add(local.dtype)
                device = device or local.device
                if local.numel() == 0:
                    # an empty shard adds nothing (and the inf-norm of it is an error)
                    continue
                key = (reduce_key, local.device, local.dtype)
                locals_, indices = groups.setdefault(key, ([], []))
                locals_.append(local)
                indices.append(layer_index)

        device = device or self.device or torch.device("cpu")
        acc_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        p = self.norm_type
        # one accumulator per reduce key: None = complete tensors, else what to reduce over;
        # flat shards reduce in float64 whatever this rank holds, so the dtypes always match
        accumulators = {
            key: torch.zeros(
                self.num_layers,
                device=device,
                dtype=torch.float64 if key is _FLAT_SHARDS else acc_dtype,
            )
            for key in reduce_keys
        }
        for (reduce_key, group_device, dtype), (locals_, indices) in groups.items():
            acc = accumulators[reduce_key]
            norms = _foreach_norms(locals_, p, group_device, dtype)
            values = torch.stack(norms).to(device=device, dtype=acc.dtype)
            index = self._index(device, indices)
            if math.isinf(p):
                acc.scatter_reduce_(0, index, values, reduce="amax", include_self=True)
            else:
                acc.index_add_(0, index, values if p == 1 else values.pow(p))

        result = torch.zeros(self.num_layers, device=device, dtype=acc_dtype)
        self.collectives_last_call = 0
        for reduce_key, acc in accumulators.items():
            if reduce_key is not None:
                self._all_reduce(acc, reduce_key)
            if math.isinf(p):
                result = torch.maximum(result, acc.to(acc_dtype))
            else:
                result += acc
        return result if math.isinf(p) or p == 1 else result.pow(1.0 / p)

    def _index(self, device: torch.device, indices: list[int]) -> Tensor:
        key = (device, tuple(indices))
        index = self._index_cache.get(key)
        if index is None:
            if len(self._index_cache) > 64:  # the set of present grads changes rarely
                self._index_cache.clear()
            index = torch.tensor(indices, dtype=torch.long, device=device)
            self._index_cache[key] = index
        return index

    def _localize(self, tensor: Tensor) -> tuple[object, Tensor]:
        """Return (reduce key, local tensor). The key names the groups to all-reduce over."""
        if DTensor is None or not isinstance(tensor, DTensor):
            return (None if self.process_group is None else _FLAT_SHARDS), tensor
        placements = tensor.placements
        if any(isinstance(pl, Partial) for pl in placements):
            # pending reductions: only the full tensor has a meaningful norm
            return None, tensor.full_tensor()
        shard_dims = tuple(i for i, pl in enumerate(placements) if isinstance(pl, Shard))
        if not shard_dims:  # fully replicated: every rank holds the whole tensor
            return None, tensor.to_local()
        assert all(isinstance(pl, (Shard, Replicate)) for pl in placements)
        return (tensor.device_mesh, shard_dims), tensor.to_local()

    def _all_reduce(self, acc: Tensor, reduce_key: object) -> None:
        if math.isinf(self.norm_type):
            # a MAX reduction may drop a NaN (max(1, nan) is 1 in some orders): make it
            # +inf, so every rank sees the same non-finite flag
            acc.nan_to_num_(nan=math.inf)
            op = dist.ReduceOp.MAX
        else:
            op = dist.ReduceOp.SUM  # NaN and inf survive a sum on every rank
        if reduce_key is _FLAT_SHARDS:
            dist.all_reduce(acc, op=op, group=self.process_group)
            self.collectives_last_call += 1
            return
        mesh, shard_dims = reduce_key  # type: ignore[misc]
        for dim in shard_dims:
            dist.all_reduce(acc, op=op, group=mesh.get_group(dim))
            self.collectives_last_call += 1


def _foreach_norms(tensors: list[Tensor], p: float, device: torch.device, dtype: torch.dtype):
    # low-precision norms overflow early (fp16 max is 65504): accumulate in float32
    out_dtype = torch.float32 if dtype in LOW_PRECISION else None
    if _has_foreach_support(tensors, device):
        return torch._foreach_norm(tensors, p, dtype=out_dtype)
    return [torch.linalg.vector_norm(t, p, dtype=out_dtype) for t in tensors]


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank-local part of a ``DTensor``; other tensors unchanged."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor
