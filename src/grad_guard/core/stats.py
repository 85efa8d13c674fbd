"""Per-layer norms from one pass over the gradients, without host syncs.

The hot path follows ``torch.nn.utils.clip_grad_norm_``: one ``torch._foreach_norm``
per (device, dtype) group, the per-tensor norms stacked and folded into per-layer
norms with a single ``index_add_`` (or ``scatter_reduce_`` for the inf-norm), planned
once per pattern of present gradients (:mod:`grad_guard.core.norm_plan`). Nothing
here calls ``.item()``, ``float()``, ``bool()``, ``.tolist()`` or ``.cpu()``: every
result stays a device tensor until somebody decides to log it.

Sharded (``DTensor``, FSDP1 flat shards) and sparse gradients take the general path of
:class:`~grad_guard.core.layer_norms.LayerNormComputer`. It and what a pass returns
(:mod:`grad_guard.core.gradient_stats`) are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import compress, repeat
from operator import is_not
from typing import Any

import torch
from torch import Tensor

from grad_guard.core.gradient_stats import (
    GradientStats,
    NormType,
    total_from_layer_norms,
    validate_norm_type,
)
from grad_guard.core.layer_norms import LayerNormComputer, local_tensor
from grad_guard.core.layers import Layer
from grad_guard.core.norm_plan import ForeachList, LayerSlices, NormPlan, StalePlan, plain_dense

# the statistics, the norm type and the layer-norm helpers are imported from here
__all__ = [
    "GradientStats",
    "GradientStatsComputer",
    "LayerNormComputer",
    "NormType",
    "compute_gradient_stats",
    "local_tensor",
    "total_from_layer_norms",
    "validate_norm_type",
]


class GradientStatsComputer:
    """Computes :class:`GradientStats` for a fixed list of layers, step after step.

    For plain dense tensors (no ``DTensor``, no ``process_group``) a step looks up a
    :class:`~grad_guard.core.norm_plan.NormPlan` by which gradients are present and runs
    it: the grouping, the index tensors and the per-layer bookkeeping are built once per
    pattern, so a steady loop does no per-tensor Python work beyond listing the grads.
    Sharded and sparse gradients take the general :class:`LayerNormComputer` path.

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
        self._flat = [p for layer in self.layers for p in layer.params]
        self._owners = [i for i, layer in enumerate(self.layers) for _ in layer.params]
        device = self._flat[0].device if self._flat else None
        self._computer = LayerNormComputer(
            len(self.layers), self.norm_type, process_group=process_group, device=device
        )
        self._device = device
        # the plan path: complete plain tensors (parameters decide; a grad has their type)
        self._planned = process_group is None and plain_dense(self._flat)
        self._plans: dict[tuple[bool, ...], _StepPlan | None] = {}
        self._all_plan: _StepPlan | None = None  # for parameters, copies, updates
        self.passes = 0  # how many statistics passes this object has made

    @property
    def collectives_last_call(self) -> int:
        return self._computer.collectives_last_call

    @property
    def planned(self) -> bool:
        """Whether passes take the planned path: dense plain tensors, no process group."""
        return self._planned

    @property
    def parameters(self) -> list[Tensor]:
        """Every parameter of the layers, in layer order (the order of :meth:`flat_norms`)."""
        return self._flat

    def __call__(self, grad_scale: Tensor | None = None) -> GradientStats:
        """One pass over the current gradients.

        Args:
            grad_scale: when the gradients are still multiplied by a GradScaler's scale
                (a fused optimizer unscales inside ``step()``), that scale (a tensor):
                the norms are divided by it, so they are those of the true gradients.
        """
        stats = self._planned_pass() if self._planned else None
        if stats is None:
            stats = self._general_pass()
        if grad_scale is not None:
            stats.layer_norms = stats.layer_norms / grad_scale.to(stats.layer_norms)
        stats.total_norm = total_from_layer_norms(stats.layer_norms, self.norm_type)
        # a norm is >= 0, so "not below inf" is NaN or inf (2 ops; isfinite takes 5)
        stats.nonfinite = ~(stats.layer_norms < math.inf)
        self.passes += 1
        return stats

    def _planned_pass(self) -> GradientStats | None:
        grads = [p.grad for p in self._flat]
        key = tuple(map(is_not, grads, repeat(None)))
        if key in self._plans:
            plan = self._plans[key]
        else:
            if len(self._plans) >= 16:  # MoE / stochastic depth: a few patterns
                self._plans.clear()
            present = list(compress(grads, key))
            plan = self._plan(key) if plain_dense(present) else None
            self._plans[key] = plan
        if plan is None:  # sparse (or otherwise special) gradients: the general path
            return None
        present = ForeachList(grads if plan.complete else compress(grads, key))
        try:
            layer_norms = plan.norms(present)
        except (NotImplementedError, RuntimeError):
            # a gradient changed its layout (turned sparse) or the model was cast or
            # moved (StalePlan): the general path now, a new plan next time
            self._plans.clear()
            self._all_plan = None
            return None
        return GradientStats(
            layer_names=self.layer_names,
            has_grad=plan.has_grad,
            layer_norms=layer_norms,
            total_norm=layer_norms,  # set by the caller
            nonfinite=layer_norms,  # set by the caller
            norm_type=self.norm_type,
            grads=present,
            params=plan.params,
            layer_grads=LayerSlices(present, plan.bounds),
            no_gradients=not plan.params,
            grad_counts=plan.counts,
        )

    def _plan(self, key: tuple[bool, ...]) -> _StepPlan:
        params = list(compress(self._flat, key))
        owners = list(compress(self._owners, key))
        counts = [0] * len(self.layers)
        for owner in owners:
            counts[owner] += 1
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        norms = NormPlan(
            [p.detach() for p in params], owners, len(self.layers), self.norm_type, self._device
        )
        has_grad = tuple(c > 0 for c in counts)
        return _StepPlan(params, all(key), has_grad, tuple(counts), tuple(bounds), norms)

    def _general_pass(self) -> GradientStats:
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
        return GradientStats(
            layer_names=self.layer_names,
            has_grad=tuple(bool(g) for g in grads_per_layer),
            layer_norms=layer_norms,
            total_norm=layer_norms,  # set by the caller
            nonfinite=layer_norms,  # set by the caller
            norm_type=self.norm_type,
            grads=flat_grads,
            params=flat_params,
            layer_grads=local_per_layer,
            no_gradients=self.process_group is None and not any(grads_per_layer),
            grad_counts=tuple(len(g) for g in local_per_layer),
        )

    def parameter_norms(self) -> Tensor:
        """``[L]`` per-layer norms of the parameters themselves (for logging steps)."""
        with torch.no_grad():
            return self.flat_norms(self._flat)

    def flat_norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[L]`` per-layer norms of one tensor per parameter, in the parameters' order.

        Args:
            tensors: like the parameters (same shapes, devices, dtypes): the parameters
                themselves, a copy of them, an update.
        """
        if self._planned:
            if self._all_plan is None:
                self._all_plan = self._plan((True,) * len(self._flat))
            try:
                return self._all_plan.norms(tensors)
            except StalePlan:  # the model was cast or moved since: plan again
                self._all_plan = self._plan((True,) * len(self._flat))
                return self._all_plan.norms(tensors)
        per_layer, start = [], 0
        for layer in self.layers:
            per_layer.append(list(tensors[start : start + len(layer.params)]))
            start += len(layer.params)
        return self._computer(per_layer)

    def norms_of(self, tensors_per_layer: Sequence[Sequence[Tensor]]) -> Tensor:
        """``[L]`` per-layer norms of arbitrary per-layer tensors (e.g. parameter updates)."""
        return self._computer(tensors_per_layer)


class _StepPlan:
    """What a step with one pattern of present gradients reuses (see ``_planned_pass``)."""

    __slots__ = ("bounds", "complete", "counts", "has_grad", "norms", "params")

    def __init__(
        self,
        params: list[Tensor],
        complete: bool,
        has_grad: tuple[bool, ...],
        counts: tuple[int, ...],
        bounds: tuple[int, ...],
        norms: NormPlan,
    ) -> None:
        self.params = params
        self.has_grad = has_grad
        self.counts = counts
        self.bounds = bounds
        self.norms = norms
        self.complete = complete  # every parameter has a gradient


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
