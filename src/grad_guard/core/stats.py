"""Per-layer norms from one pass over the gradients, without host syncs.

The hot path follows ``torch.nn.utils.clip_grad_norm_``: one ``torch._foreach_norm``
per (device, dtype) group, the per-tensor norms stacked and folded into per-layer
norms with a single ``index_add_`` (or ``scatter_reduce_`` for the inf-norm). Nothing
here calls ``.item()``, ``float()``, ``bool()``, ``.tolist()`` or ``.cpu()``: every
result stays a device tensor until somebody decides to log it.

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
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils._foreach_utils import _has_foreach_support

from grad_guard.core.layers import Layer

try:  # torch.distributed is optional (some builds ship without it)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

NormType = float | Literal["inf"]
"""p of a p-norm: a positive number, or ``"inf"`` (also ``float("inf")``) for the max-norm."""
_FLAT_SHARDS = "flat_shards"  # reduce key of plain tensors sharded over `process_group`


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
        layer_grads: the local gradient tensors grouped per layer.
        no_gradients: True when the step had no gradient at all (e.g. ``training_step``
            returned ``None``): nothing to judge or clip, and no statistic should learn
            from the zero norm. Always False for flat shards, where a rank cannot tell
            without a collective.
    """

    layer_names: tuple[str, ...]
    has_grad: tuple[bool, ...]
    layer_norms: Tensor
    total_norm: Tensor
    nonfinite: Tensor
    norm_type: float
    grads: list[Tensor] = field(default_factory=list, repr=False)
    params: list[Tensor] = field(default_factory=list, repr=False)
    layer_grads: list[list[Tensor]] = field(default_factory=list, repr=False)
    no_gradients: bool = False

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
        self.norm_type = validate_norm_type(norm_type)
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
    out_dtype = torch.float32 if dtype in _LOW_PRECISION else None
    if _has_foreach_support(tensors, device):
        return torch._foreach_norm(tensors, p, dtype=out_dtype)
    return [torch.linalg.vector_norm(t, p, dtype=out_dtype) for t in tensors]


def total_from_layer_norms(layer_norms: Tensor, norm_type: float) -> Tensor:
    """Combine per-layer p-norms into the p-norm over everything (no host sync)."""
    if layer_norms.numel() == 0:
        return layer_norms.new_zeros(())
    if math.isinf(norm_type):
        return layer_norms.max()
    return torch.linalg.vector_norm(layer_norms, norm_type)


class GradientStatsComputer:
    """Computes :class:`GradientStats` for a fixed list of layers, step after step.

    Keeps the index tensors it builds, so a steady training loop allocates nothing new
    on the host side after the first step.

    Args:
        layers: the layers to measure (see :func:`grad_guard.core.layers.group_parameters`).
        norm_type: p of the p-norm, ``2.0`` by default, ``float('inf')`` for the max-norm.
        process_group: for FSDP1 (flat parameters sharded over this group): the gradients
            are each rank's slice, and their ``|g|^p`` sums are all-reduced over the group
            once per pass, so ``layer_norms`` and ``total_norm`` are those of the full
            gradients on every rank. ``has_grad``, ``grads`` and ``params`` stay local: a
            layer whose slice lies wholly on another rank has ``has_grad`` False here.
            ``None`` (default) for complete tensors and ``DTensor`` (which carries its own
            mesh).

    Raises:
        ValueError: if ``norm_type`` is not positive.

    Example:
        >>> from torch import nn
        >>> from grad_guard.core.layers import group_parameters
        >>> model = nn.Linear(3, 1)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> stats = GradientStatsComputer(group_parameters(model))()
        >>> stats.layer_names, round(stats.total_norm.item(), 4)
        (('(root)',), 4.0)
    """

    def __init__(
        self, layers: Sequence[Layer], norm_type: float = 2.0, process_group: Any = None
    ) -> None:
        self.layers = tuple(layers)
        self.norm_type = validate_norm_type(norm_type)
        self.process_group = process_group
        self.layer_names = tuple(layer.name for layer in self.layers)
        self._names = [layer.param_names for layer in self.layers]
        device = next((p.device for layer in self.layers for p in layer.params), None)
        self._computer = LayerNormComputer(
            len(self.layers), self.norm_type, process_group=process_group, device=device
        )
        self.passes = 0  # how many statistics passes this object has made

    @property
    def collectives_last_call(self) -> int:
        return self._computer.collectives_last_call

    def __call__(self, grad_scale: Tensor | None = None) -> GradientStats:
        """One pass over the current gradients.

        Args:
            grad_scale: when the gradients are still multiplied by a GradScaler's scale
                (a fused optimizer unscales inside ``step()``), that scale (a tensor):
                the norms are divided by it, so they are those of the true gradients.
        """
        grads_per_layer: list[list[Tensor]] = []
        local_per_layer: list[list[Tensor]] = []
        flat_grads: list[Tensor] = []
        flat_params: list[Tensor] = []
        for layer in self.layers:
            layer_grads, layer_locals = [], []
            for param in layer.params:
                grad = param.grad
                if grad is None:
                    continue
                layer_grads.append(grad)
                layer_locals.append(local_tensor(grad))
                flat_params.append(param)
            grads_per_layer.append(layer_grads)
            local_per_layer.append(layer_locals)
            flat_grads.extend(layer_locals)
        layer_norms = self._computer(grads_per_layer, self._names)
        if grad_scale is not None:
            layer_norms = layer_norms / grad_scale.to(layer_norms)
        self.passes += 1
        return GradientStats(
            layer_names=self.layer_names,
            has_grad=tuple(bool(g) for g in grads_per_layer),
            layer_norms=layer_norms,
            total_norm=total_from_layer_norms(layer_norms, self.norm_type),
            nonfinite=~torch.isfinite(layer_norms),
            norm_type=self.norm_type,
            grads=flat_grads,
            params=flat_params,
            layer_grads=local_per_layer,
            no_gradients=self.process_group is None and not any(grads_per_layer),
        )

    def parameter_norms(self) -> Tensor:
        """``[L]`` per-layer norms of the parameters themselves (for logging steps)."""
        return self._computer([[p.detach() for p in layer.params] for layer in self.layers])

    def norms_of(self, tensors_per_layer: Sequence[Sequence[Tensor]]) -> Tensor:
        """``[L]`` per-layer norms of arbitrary per-layer tensors (e.g. parameter updates)."""
        return self._computer(tensors_per_layer)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank-local part of a ``DTensor``; other tensors unchanged."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def compute_gradient_stats(layers: Sequence[Layer], norm_type: float = 2.0) -> GradientStats:
    """Stateless form of :class:`GradientStatsComputer`: one pass over ``layers``' grads.

    Args:
        layers: the layers to measure.
        norm_type: p of the p-norm.

    Returns:
        The :class:`GradientStats` of the current gradients.

    Example:
        >>> from torch import nn
        >>> from grad_guard.core.layers import group_parameters
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> compute_gradient_stats(group_parameters(model)).layer_names
        ('0', '1')
    """
    return GradientStatsComputer(layers, norm_type)()
