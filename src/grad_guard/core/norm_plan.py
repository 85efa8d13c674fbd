"""The plan of a statistics pass over plain tensors, built once per pattern of present grads.

Per step, :class:`~grad_guard.core.stats.GradientStatsComputer` only lists the gradients,
looks the plan up by which of them are ``None``, and runs it: one ``torch._foreach_norm``
per (device, dtype) group, one ``stack`` and one fold into per-layer norms with a cached
index (none at all when every layer is one tensor). The grouping, the index tensors and
the per-layer bookkeeping are built on the first step with a new pattern and reused.

A plan is built from the *parameters*: a gradient always has its parameter's device,
dtype and shape (autograd enforces it). Sparse gradients and ``DTensor`` need the general
path of :class:`~grad_guard.core.stats.LayerNormComputer`; :func:`plain_dense` says
whether a list of gradients can take the plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices

LOW_PRECISION = (torch.float16, torch.bfloat16)
"""The dtypes whose norms are accumulated in float32 (they overflow early)."""


class NormPlan:
    """Per-layer p-norms of a fixed list of dense, plain tensors, in few device ops.

    Args:
        tensors: the tensors the plan is for (parameters, or their gradients), in
            layer order; later calls get tensors of the same devices, dtypes and shapes.
        owners: the layer index of each tensor, non-decreasing.
        num_layers: how many layers the result has.
        norm_type: the p of the p-norm (``math.inf`` for the max-norm).
        device: where the result lives when there is no tensor at all.

    Example:
        >>> plan = NormPlan([torch.ones(4), torch.ones(5)], [0, 0], 2, 2.0)
        >>> plan([torch.ones(4), torch.full((5,), 2.0)])
        tensor([4.8990, 0.0000])
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        owners: Sequence[int],
        num_layers: int,
        norm_type: float,
        device: torch.device | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.norm_type = norm_type
        dtypes = {t.dtype for t in tensors}
        self.acc_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.device = tensors[0].device if tensors else (device or torch.device("cpu"))
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for position, tensor in enumerate(tensors):
            if tensor.numel():  # an empty tensor adds nothing (its inf-norm is an error)
                groups.setdefault((tensor.device, tensor.dtype), []).append(position)
        foreach_devices = set(_get_foreach_kernels_supported_devices()) | {"cpu"}
        #: (positions, or None for all tensors in order; device; dtype; foreach; output dtype)
        self.groups: list[
            tuple[list[int] | None, torch.device, torch.dtype, bool, torch.dtype | None]
        ] = []
        grouped: list[int] = []
        for (group_device, dtype), positions in groups.items():
            whole = len(groups) == 1 and len(positions) == len(tensors)
            out_dtype = torch.float32 if dtype in LOW_PRECISION else None
            foreach = group_device.type in foreach_devices
            group = (None if whole else positions, group_device, dtype, foreach, out_dtype)
            self.groups.append(group)
            grouped.extend(positions)
        layer_of = [owners[i] for i in grouped]
        #: every layer is exactly one tensor, in order: the stacked norms are the result
        self.identity = len(self.groups) == 1 and layer_of == list(range(num_layers))
        #: every layer is ``uniform`` consecutive tensors (a weight and a bias, say): one
        #: norm over a ``[num_layers, uniform]`` view folds them
        per_layer = len(layer_of) // num_layers if num_layers else 0
        self.uniform = (
            per_layer
            if per_layer > 1 and layer_of == [i // per_layer for i in range(len(layer_of))]
            else 0
        )
        self.index = torch.tensor(layer_of, dtype=torch.long, device=self.device)

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """The ``[num_layers]`` norms of ``tensors`` (same layout as at construction).

        Raises:
            StalePlan: when a group's first tensor changed device or dtype (the model was
                moved or cast after the plan was made): make a new plan.
        """
        p = self.norm_type
        parts = []
        for positions, device, dtype, foreach, out_dtype in self.groups:
            members = tensors if positions is None else [tensors[i] for i in positions]
            if members[0].dtype != dtype or members[0].device != device:
                raise StalePlan(f"planned for {dtype} on {device}, got {members[0].dtype}")
            if foreach:
                norms = torch._foreach_norm(members, p, dtype=out_dtype)
            else:
                norms = [torch.linalg.vector_norm(t, p, dtype=out_dtype) for t in members]
            values = torch.stack(norms)
            if device != self.device or values.dtype != self.acc_dtype:
                values = values.to(device=self.device, dtype=self.acc_dtype)
            parts.append(values)
        if not parts:
            return torch.zeros(self.num_layers, device=self.device, dtype=self.acc_dtype)
        values = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.identity:
            return values
        if self.uniform:
            return torch.linalg.vector_norm(values.view(self.num_layers, self.uniform), p, dim=1)
        result = torch.zeros(self.num_layers, device=self.device, dtype=self.acc_dtype)
        if math.isinf(p):
            return result.scatter_reduce_(0, self.index, values, reduce="amax", include_self=True)
        result.index_add_(0, self.index, values if p == 1 else values.pow(p))
        return result if p == 1 else result.pow(1.0 / p)


class StalePlan(RuntimeError):
    """The tensors no longer have the devices and dtypes a :class:`NormPlan` was made for."""


class ForeachList(list):
    """A list of dense plain tensors on one device with one dtype (one foreach group).

    :func:`grad_guard.core.clip.base.scale_grads_` multiplies such a list with a single
    ``torch._foreach_mul_`` without looking at every tensor again.
    """

    __slots__ = ()


class LayerSlices(Sequence):
    """The tensors of each layer, as slices of one flat list (built when asked for).

    Example:
        >>> slices = LayerSlices(["a", "b", "c"], (0, 2, 2, 3))
        >>> list(slices)
        [['a', 'b'], [], ['c']]
    """

    def __init__(self, flat: Sequence, bounds: Sequence[int]) -> None:
        self._flat = flat
        self._bounds = bounds

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return list(self._flat[self._bounds[index] : self._bounds[index + 1]])

    def __iter__(self) -> Iterator[list]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return repr(list(self))


def plain_dense(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is a dense tensor of a plain type (no ``DTensor``, no sparse)."""
    plain = (Tensor, torch.nn.Parameter)
    return all(type(t) in plain and t.layout == torch.strided for t in tensors)
