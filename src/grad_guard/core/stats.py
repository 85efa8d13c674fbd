"""Per-layer norms from one pass over the gradients, without host syncs.

The hot path follows ``torch.nn.utils.clip_grad_norm_``: one ``torch._foreach_norm``
per (device, dtype) group, the per-tensor norms stacked and folded into per-layer
norms with a single ``index_add_`` (or ``scatter_reduce_`` for the inf-norm), planned
once per pattern of present gradients (:mod:`grad_guard.core.norm_plan`). Nothing
here calls ``.item()``, ``float()``, ``bool()``, ``.tolist()`` or ``.cpu()``: every
result stays a device tensor until somebody decides to log it.

Sharded (``DTensor``, FSDP1 flat shards) and sparse gradients take the general path of
:class:`~grad_guard.core.layer_norms.LayerNormComputer` (re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import is_not
from typing import Any, Literal

import torch
from torch import Tensor

from grad_guard.core.layer_norms import LayerNormComputer, local_tensor
from grad_guard.core.layers import Layer
from grad_guard.core.norm_plan import (
    LOW_PRECISION,
    ForeachList,
    LayerSlices,
    NormPlan,
    StalePlan,
    plain_dense,
)

_LOW_PRECISION = LOW_PRECISION

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
        stats.nonfinite = ~torch.isfinite(stats.layer_norms)
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
