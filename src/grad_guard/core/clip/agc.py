"""``AGC``: unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

The units and their norms are in :mod:`grad_guard.core.clip.units` (``Unit``,
``unit_layout``, ``unitwise_norm`` are re-exported here).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grad_guard._validation import check_bool, check_float, check_patterns
from grad_guard.core.clip.base import (
    ClipAlgorithm,
    ClipResult,
    scale_grads_,
    state_tensor,
)
from grad_guard.core.clip.units import (
    DTensor,
    Unit,
    default_unit,
    reduce_cut_units,
    unit_layout,
    unitwise_norm,
)
from grad_guard.core.norm_plan import LOW_PRECISION as _LOW_PRECISION
from grad_guard.core.stats import local_tensor

__all__ = ["AGC", "Unit", "default_unit", "unit_layout", "unitwise_norm"]


@dataclass
class _Plan:
    """Which gradients are whole units, split into units, or left alone."""

    whole: list[int] = field(default_factory=list)
    split: list[int] = field(default_factory=list)
    excluded: list[int] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)  # per split tensor
    dims: list[tuple[int, ...]] = field(default_factory=list)  # dims reduced, per split tensor
    shapes: list[tuple[int, ...]] = field(default_factory=list)  # coefficient shape
    sizes: list[int] = field(default_factory=list)  # coefficient.split sizes
    convert: bool = False  # coefficients need a dtype/device change


class AGC(ClipAlgorithm):
    r"""Adaptive gradient clipping: bound each unit's gradient relative to its weights.

    AGC (Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization") clips per *unit* (one output row of a ``Linear``, one filter of a
    ``Conv``): a unit whose gradient norm exceeds ``clip_factor`` times its weight norm
    is scaled down to that bound,

    .. math::
        G_i \leftarrow \lambda \frac{\max(\|W_i\|, \epsilon)}{\|G_i\|} G_i
        \quad\text{if}\quad \frac{\|G_i\|}{\max(\|W_i\|, \epsilon)} > \lambda .

    Units (found from the layer types when the model is known, see :meth:`bind`):

    - ``Linear``, ``Conv*d``, ``Embedding`` and other tensors with >= 2 dims: along dim
      0 (output features, filters, embedding rows).
    - ``ConvTranspose*d``: along dim 1, the output channels (its weight is
      ``(in, out/groups, *kernel)``); with ``groups > 1`` each (group, channel) pair.
    - 1-D and 0-D tensors (biases, norm gains, scalars): the whole tensor is one unit,
      as in the paper's reference code.
    - The output head, the last module (definition order) owning a weight with >= 2
      dims, is left alone (``exclude_head=True``): the paper finds clipping the final
      classifier hurts. ``exclude`` adds regexes on parameter names.

    Without the model (``agc(model.parameters())`` instead of ``agc(model)``), every
    tensor with >= 2 dims is split along dim 0, ``ConvTranspose`` layers are not
    recognised and no head is excluded; a warning says so once.

    Sharded parameters (FSDP2 ``DTensor``): FSDP2 shards dim 0, so the units of
    ``Linear``/``Conv``/``Embedding`` weights are whole on each rank and need no
    communication. Units cut by the sharding (``ConvTranspose``, whose units lie along
    dim 1; tensor-parallel ``Shard(1)`` weights) get their squared norms summed over the
    shards with one all-reduce per tensor; 1-D tensors share one all-reduce. Grouped
    ``ConvTranspose`` weights cannot be cut and raise ``RuntimeError`` when sharded.

    Cost: it reads the weights as well as the gradients, and unit norms take one kernel
    per tensor (there is no foreach form with a ``dim``): measured at 1.7-1.8x
    ``clip_grad_norm_`` on a 12M-parameter MLP (``benchmarks/clipping.py``), 0.45x
    timm's per-parameter loop. The pre- and post-clip total norms come from the unit
    norms, without another read.

    Args:
        clip_factor: :math:`\lambda`, the largest allowed gradient/weight norm ratio (> 0);
            the paper uses 0.01 for large batches, up to 0.16 for small ones.
        eps: :math:`\epsilon`, floor of the weight norm (> 0), so that zero-initialised
            units can still move.
        exclude_head: leave the output head unclipped.
        exclude: regex or list of regexes; parameters whose qualified name matches one
            are not clipped.

    Raises:
        ValueError: if an argument is out of range or a regex is invalid.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
        >>> model[0].weight.grad = torch.tensor([[0.0, 1.0], [0.0, 0.001]])
        >>> agc = AGC(clip_factor=0.1)
        >>> _ = agc(model)  # row 0: 1.0 > 0.1 * 5 -> scaled to 0.5; row 1 is within 0.1 * 1
        >>> model[0].weight.grad
        tensor([[0.0000, 0.5000],
                [0.0000, 0.0010]])
    """

    measures_itself = True  # the unit norms give the total norm too

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude_head: bool = True,
        exclude: str | list[str] | None = None,
    ) -> None:
        super().__init__()
        self.clip_factor = check_float("clip_factor", clip_factor)
        self.eps = check_float("eps", eps)
        self.exclude_head = check_bool("exclude_head", exclude_head)
        check_patterns("exclude", exclude)
        self.exclude = exclude
        self._module: weakref.ref[nn.Module] | None = None
        self._layout: dict[int, Unit] = {}
        self._warned_unbound = False
        self._cached_plan: tuple[Any, _Plan] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the model is re-bound at the next setup; a weak reference does not pickle
        state = self.__dict__.copy()
        state.update(_module=None, _layout={}, _cached_plan=None)
        return state

    def bind(self, module: nn.Module) -> None:
        """Use ``module``'s layer types and head to split its parameters into units."""
        if self._module is None or self._module() is not module:
            self._module = weakref.ref(module)
            self._layout = unit_layout(module, self.exclude_head, self.exclude)
            self._cached_plan = None

    def units(self, params: Sequence[Tensor]) -> list[Unit]:
        """The :class:`Unit` of each parameter."""
        missing = [p for p in params if id(p) not in self._layout]
        if missing:
            module = self._module() if self._module is not None else None
            if module is not None:  # parameters replaced since bind (e.g. FSDP2 sharding)
                self._layout = unit_layout(module, self.exclude_head, self.exclude)
            elif not self._warned_unbound:
                self._warned_unbound = True
                warnings.warn(
                    "grad_guard: AGC got parameters without their model, so every tensor "
                    "with >= 2 dims is split along dim 0 (ConvTranspose layers are not "
                    "recognised) and the output head is clipped too. Pass the model: "
                    "`agc(model)` or `agc.bind(model)`.",
                    stacklevel=4,
                )
        return [self._layout.get(id(p)) or default_unit(p) for p in params]

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor | None,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        if params is None:
            raise ValueError("AGC needs the parameters as well as the gradients (`params`)")
        plan = self._plan(grads, params)
        sharded = any(DTensor is not None and isinstance(p.grad, DTensor) for p in params)
        if total_norm is None and sharded:
            total_norm = self.norm_computer(1, 2.0)([[p.grad for p in params]])[0]  # type: ignore[misc]
        if total_norm is not None:
            dtype, device = total_norm.dtype, total_norm.device
        else:
            wide = any(g.dtype == torch.float64 for g in grads)
            dtype = torch.float64 if wide else torch.float32
            device = grads[0].device if grads else torch.device("cpu")

        # unit norms of gradients and weights, flattened in plan order
        grad_parts: list[Tensor] = []
        weight_parts: list[Tensor] = []
        if plan.whole:
            both = [params[i].grad for i in plan.whole] + [params[i].detach() for i in plan.whole]
            norms = self.tensor_norms(both)  # type: ignore[arg-type]
            grad_parts.append(norms[: len(plan.whole)])
            weight_parts.append(norms[len(plan.whole) :])
        for i, unit, dims in zip(plan.split, plan.units, plan.dims):
            g, w = grads[i], local_tensor(params[i].detach())
            if unit.groups > 1:
                g, w = g.unflatten(0, (unit.groups, -1)), w.unflatten(0, (unit.groups, -1))
            low = torch.float32 if g.dtype in _LOW_PRECISION else None
            g_norm = torch.linalg.vector_norm(g, dim=dims, dtype=low)
            w_norm = torch.linalg.vector_norm(w, dim=dims, dtype=low)
            if sharded:
                g_norm, w_norm = reduce_cut_units(params[i], unit, g_norm, w_norm)
            if unit.groups > 1:
                g_norm, w_norm = g_norm.reshape(-1), w_norm.reshape(-1)
            grad_parts.append(g_norm)
            weight_parts.append(w_norm)
        kept_sq = torch.zeros((), device=device, dtype=dtype)
        if plan.excluded and not sharded:
            kept = [torch.linalg.vector_norm(grads[i], dtype=torch.float32) for i in plan.excluded]
            kept_sq = torch.stack(kept).to(device=device, dtype=dtype).square().sum()
        if grad_parts:
            g_all = torch.cat(grad_parts).to(device=device, dtype=dtype)
            w_all = torch.cat(weight_parts).to(device=device, dtype=dtype)
        else:
            g_all = w_all = torch.zeros(0, device=device, dtype=dtype)
        if total_norm is None:  # the unit norms hold the whole gradient
            total_norm = (g_all.square().sum() + kept_sq).sqrt()

        bound = w_all.clamp(min=self.eps) * self.clip_factor
        trigger = torch.isfinite(g_all) & (g_all > bound)
        coefficient = torch.where(trigger, bound / g_all.clamp(min=1e-6), torch.ones_like(g_all))
        pieces = coefficient.split(plan.sizes)
        targets: list[Tensor] = [grads[i] for i in plan.whole]
        factors: list[Tensor] = list(pieces[0].unbind(0)) if plan.whole else []
        for i, unit, shape, piece in zip(plan.split, plan.units, plan.shapes, pieces[1:]):
            grad = grads[i]
            targets.append(grad.unflatten(0, (unit.groups, -1)) if unit.groups > 1 else grad)
            factors.append(piece.view(shape))
        if plan.convert:
            factors = [f.to(t.device, t.dtype) for t, f in zip(targets, factors)]
        scale_grads_(targets, factors)

        if sharded:
            post = self.norm_computer(1, 2.0)([[p.grad for p in params]])[0].to(total_norm)  # type: ignore[misc]
        else:
            post = ((g_all * coefficient).square().sum() + kept_sq).sqrt()
        threshold = state_tensor(self.clip_factor, total_norm)
        return ClipResult(total_norm, post, threshold, trigger.any())

    def _plan(self, grads: list[Tensor], params: Sequence[Tensor]) -> _Plan:
        """How to split these gradients into units (cached while the parameters stay)."""
        key = (tuple(id(p) for p in params), tuple(g.shape for g in grads))
        if self._cached_plan is not None and self._cached_plan[0] == key:
            return self._cached_plan[1]
        plan = _Plan()
        for i, unit in enumerate(self.units(params)):
            grad = grads[i]
            if unit.excluded:
                plan.excluded.append(i)
            elif unit.dim is None or grad.ndim < 2:
                plan.whole.append(i)
            else:
                plan.split.append(i)
                plan.units.append(unit)
                if unit.groups > 1:
                    view_shape = grad.unflatten(0, (unit.groups, -1)).shape
                    keep = (0, 2)
                else:
                    view_shape, keep = grad.shape, (unit.dim,)
                plan.dims.append(tuple(d for d in range(len(view_shape)) if d not in keep))
                shape = tuple(n if d in keep else 1 for d, n in enumerate(view_shape))
                plan.shapes.append(shape)
                plan.sizes.append(math.prod(shape))
        plan.sizes.insert(0, len(plan.whole))
        devices = {g.device for g in grads}
        plan.convert = len(devices) > 1 or any(g.dtype != torch.float32 for g in grads)
        self._cached_plan = (key, plan)
        return plan

    def _arguments(self) -> dict[str, Any]:
        return {
            "clip_factor": self.clip_factor,
            "eps": self.eps,
            "exclude_head": self.exclude_head,
            "exclude": self.exclude,
        }
