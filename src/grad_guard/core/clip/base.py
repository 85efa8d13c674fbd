"""What every clipping algorithm shares: the two entry points, the result, the counters.

An algorithm is used in one of two ways:

* in a plain PyTorch loop, ``clipper(model)`` or ``clipper(parameters)`` between
  ``loss.backward()`` and ``optimizer.step()``; it reads the gradients once (one
  ``torch._foreach_norm`` per device and dtype, ``DTensor`` shards reduced to the norm of
  the full gradient) and returns the pre-clip total norm, like
  ``torch.nn.utils.clip_grad_norm_``;
* from a statistics pass that has already been made, ``clipper.clip_stats(stats)`` or
  ``clipper.clip_(grads, total_norm, params)``, so that a Lightning callback that also
  logs the norms reads the gradients only once.

Either way the gradients are scaled in place by a coefficient that stays on the device
(``torch._foreach_mul_`` per device and dtype, as ``clip_grad_norm_`` does): nothing
asks the host whether to clip, so a step never waits for the accelerator. A gradient
whose norm is NaN or infinite is left untouched (there is no meaningful rescaling of
it) and does not enter any running statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from grad_guard.core.clip.result import NORM_EPS, ClipResult, norm_coefficient, state_tensor
from grad_guard.core.clip.scaling import plain_norms, scale_grads_
from grad_guard.core.stats import (
    GradientStats,
    LayerNormComputer,
    local_tensor,
    total_from_layer_norms,
)

# the result and coefficient (clip/result.py) and the in-place scaling (clip/scaling.py),
# re-exported: the clipping algorithms import them from here
__all__ = [
    "NORM_EPS",
    "ClipAlgorithm",
    "ClipResult",
    "norm_coefficient",
    "plain_norms",
    "scale_grads_",
    "state_tensor",
]


def _as_parameters(parameters: nn.Module | Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(parameters, nn.Module):
        return list(parameters.parameters())
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


class ClipAlgorithm:
    """Base class of the clipping algorithms (not used directly).

    Subclasses implement :meth:`_clip` and, when they keep statistics, ``_state`` and
    ``_load_state``. The base class provides the two entry points, the counters
    (``steps``, ``clipped_steps``), ``last`` (the :class:`ClipResult` of the latest step)
    and ``state_dict()`` / ``load_state_dict()``.

    Attributes:
        norm_type: p of the total norm the algorithm works on.
        granularity: which per-layer norms the algorithm wants from a shared statistics
            pass: ``"module"`` (only the total is used) or ``"parameter"`` (one norm
            per tensor).
        process_group: for FSDP1, the group over which the (plain-tensor) gradients are
            slices of flat parameters, so that norms the algorithm computes itself are
            summed over it; ``None`` (default) otherwise. ``DTensor`` needs nothing.
    """

    norm_type: float = 2.0
    granularity: Literal["module", "parameter"] = "module"
    #: computes the pre-clip total norm from its own pass (AGC's unit norms)
    measures_itself: bool = False
    _defer_scaling: bool = False
    _deferred: Tensor | None = None

    def __init__(self) -> None:
        self.steps = 0
        self.clipped_steps = torch.zeros((), dtype=torch.long)
        self.last: ClipResult | None = None
        self.process_group: Any = None
        self._computers: dict[tuple, LayerNormComputer] = {}
        self._indices: dict[tuple, Tensor] = {}

    # -- entry points ------------------------------------------------------------------

    def __call__(self, parameters: nn.Module | Iterable[Tensor] | Tensor) -> Tensor:
        """Clip the gradients of ``parameters`` in place; return the pre-clip total norm.

        Args:
            parameters: the model (preferred: AGC then knows the layer types and the
                output head), an iterable of parameters, or one tensor.

        Returns:
            The total p-norm of the gradients before clipping (a scalar tensor), as
            ``torch.nn.utils.clip_grad_norm_`` returns it.
        """
        if isinstance(parameters, nn.Module):
            self.bind(parameters)
        params = [p for p in _as_parameters(parameters) if p.grad is not None]
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in params]  # type: ignore[arg-type]
            if self.measures_itself:
                return self.clip_(grads, None, params).pre_norm
            norms = self.tensor_norms([p.grad for p in params])  # type: ignore[misc]
            total = total_from_layer_norms(norms, self.norm_type)
            return self.clip_(grads, total, params, norms).pre_norm

    def clip_stats(self, stats: GradientStats, apply: bool = True) -> ClipResult:
        """Clip the gradients of a statistics pass in place (no second read for the norm).

        Args:
            stats: the pass over the gradients to clip, made with this algorithm's
                ``norm_type`` (and ``granularity="parameter"`` for per-tensor modes, else
                the per-tensor norms are computed here).
            apply: see :meth:`clip_`.

        Returns:
            The :class:`ClipResult` of this step.
        """
        if stats.no_gradients:  # a zero norm must not enter the statistics
            total = stats.total_norm
            return ClipResult(total, total, torch.full_like(total, math.inf), total != total)
        tensor_norms = None
        counts = stats.grad_counts or tuple(len(g) for g in stats.layer_grads)
        if self.granularity == "parameter" and all(c <= 1 for c in counts):
            # layers without a local gradient (none this step, or a slice on another rank)
            present = tuple(i for i, count in enumerate(counts) if count)
            if len(present) == len(counts):
                tensor_norms = stats.layer_norms
            else:
                tensor_norms = stats.layer_norms.index_select(
                    0, self._index(present, stats.layer_norms.device)
                )
        return self.clip_(stats.grads, stats.total_norm, stats.params, tensor_norms, apply=apply)

    def clip_(
        self,
        grads: Sequence[Tensor],
        total_norm: Tensor | None,
        params: Sequence[Tensor] | None = None,
        tensor_norms: Tensor | None = None,
        apply: bool = True,
    ) -> ClipResult:
        """Clip ``grads`` in place given their precomputed total norm.

        Args:
            grads: the gradient tensors to scale (local shards for ``DTensor``).
            total_norm: their total p-norm (over all shards), a scalar tensor; ``None``
                to have it computed here (one more read of the gradients, except for
                AGC, which gets it from its unit norms).
            params: the parameters the gradients belong to, same order; needed by AGC,
                and used to reduce per-tensor norms over shards.
            tensor_norms: ``[len(grads)]`` per-tensor norms, if known (per-tensor modes).
            apply: ``False`` to leave the multiplication to the caller when the
                algorithm scales every gradient by one factor (``NormClip``, ``AutoClip``,
                ``ZClip``): the factor is returned as ``ClipResult.coefficient``, e.g.
                to be folded into a fused optimizer's ``grad_scale``. Per-tensor
                algorithms clip in place either way.

        Returns:
            The :class:`ClipResult` of this step.
        """
        self._defer_scaling, self._deferred = not apply, None
        with torch.no_grad():
            if total_norm is None and not self.measures_itself:
                sources = grads if params is None else [p.grad for p in params]
                tensor_norms = self.tensor_norms(sources)  # type: ignore[arg-type]
                total_norm = total_from_layer_norms(tensor_norms, self.norm_type)
            if total_norm is not None:
                total_norm = total_norm.detach()
            try:
                grads = grads if isinstance(grads, list) else list(grads)
                result = self._clip(grads, total_norm, params, tensor_norms)  # type: ignore[arg-type]
            finally:
                self._defer_scaling = False
            result.coefficient, self._deferred = self._deferred, None
        if self.clipped_steps.device != result.clipped.device:
            self.clipped_steps = self.clipped_steps.to(result.clipped.device)
        self.clipped_steps = self.clipped_steps + result.clipped
        self.steps += 1
        self.last = result
        return result

    def bind(self, module: nn.Module) -> None:
        """Learn about the model the gradients come from (AGC needs layer types)."""

    def _scale_(self, grads: Sequence[Tensor], coefficient: Tensor) -> None:
        """Multiply every gradient by one ``coefficient``, or keep it for the caller."""
        if self._defer_scaling:
            self._deferred = coefficient
        else:
            scale_grads_(grads, coefficient)

    # -- to implement ------------------------------------------------------------------

    def _clip(
        self,
        grads: list[Tensor],
        total_norm: Tensor,
        params: Sequence[Tensor] | None,
        tensor_norms: Tensor | None,
    ) -> ClipResult:
        raise NotImplementedError

    def _state(self) -> dict[str, Tensor]:
        return {}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        pass

    # -- helpers -----------------------------------------------------------------------

    def tensor_norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """``[len(tensors)]`` p-norms, one per tensor, reduced over ``DTensor`` shards (and
        over ``process_group`` for FSDP1 slices)."""
        if self.process_group is None:
            norms = plain_norms(tensors, self.norm_type)
            if norms is not None:
                return norms
        return self.norm_computer(len(tensors), self.norm_type)([[t] for t in tensors])

    def norm_computer(self, num_layers: int, norm_type: float) -> LayerNormComputer:
        """A cached :class:`LayerNormComputer` reducing over this algorithm's shards."""
        key = (num_layers, norm_type, id(self.process_group))
        computer = self._computers.get(key)
        if computer is None:
            if len(self._computers) > 8:
                self._computers.clear()
            computer = LayerNormComputer(num_layers, norm_type, process_group=self.process_group)
            self._computers[key] = computer
        return computer

    def _index(self, positions: tuple[int, ...], device: torch.device) -> Tensor:
        key = (positions, device)
        index = self._indices.get(key)
        if index is None:
            if len(self._indices) > 8:
                self._indices.clear()
            index = torch.tensor(positions, dtype=torch.long, device=device)
            self._indices[key] = index
        return index

    @property
    def clipped_fraction(self) -> float:
        """Fraction of steps clipped so far (copies one number to the host)."""
        return float(self.clipped_steps) / self.steps if self.steps else 0.0

    def state_dict(self) -> dict[str, Tensor]:
        """Counters and statistics as tensors (copies), for a checkpoint."""
        state = {
            "steps": torch.tensor(self.steps, dtype=torch.long),
            "clipped_steps": self.clipped_steps.detach().clone(),
        }
        state.update({k: v.detach().clone() for k, v in self._state().items()})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next step continues exactly.

        Raises:
            ValueError: if the state does not fit this algorithm's configuration.
        """
        state = dict(state_dict)
        self.steps = int(state.pop("steps", 0))
        self.clipped_steps = torch.as_tensor(state.pop("clipped_steps", 0)).long().clone()
        self._load_state({k: torch.as_tensor(v).clone() for k, v in state.items()})

    def _arguments(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({args})"
