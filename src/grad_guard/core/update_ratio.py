"""Update/weight ratio ``||w_after - w_before|| / ||w_before||`` per layer, on the device.

On a logging step the weights are copied before the optimizer moves them; after the
step the copy is turned into ``-(update)`` in place (no second copy of the model) and
its per-layer norms are taken. The norms stay device tensors until the caller copies
them to the host with whatever else it reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grad_guard.core.norm_plan import plain_dense
from grad_guard.core.stats import GradientStatsComputer


@dataclass
class UpdateNorms:
    """Per-layer norms of one step's update and of the weights before it.

    Attributes:
        step: the logging step the update belongs to.
        norms: ``[2, L]`` float tensor: update norms, then weight norms.
    """

    step: int
    norms: Tensor

    def ratios(self, values: list[float]) -> list[float]:
        """The ratios from ``norms`` copied to the host (``2 * L`` floats)."""
        half = len(values) // 2
        return [u / max(w, 1e-12) for u, w in zip(values[:half], values[half:])]


class UpdateSnapshot:
    """Weights of one optimizer's layers before a logging step, for its update ratio.

    Args:
        computer: the statistics computer of the layers (its norms reduce over shards).
        step: the logging step.
        weight_norms: the ``[L]`` weight norms before the step, when already computed
            (the monitor computes them for ``param_norm``); else they are taken here.

    Example:
        >>> from torch import nn
        >>> from grad_guard.core.layers import group_parameters
        >>> model = nn.Linear(2, 1, bias=False)
        >>> nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1., 1.]], requires_grad=True)
        >>> snapshot = UpdateSnapshot(GradientStatsComputer(group_parameters(model)), step=0)
        >>> with torch.no_grad():
        ...     model.weight.sub_(0.1)
        Parameter containing:
        tensor([[0.9000, 0.9000]], requires_grad=True)
        >>> update = snapshot.measure()
        >>> [round(r, 3) for r in update.ratios(update.norms.flatten().tolist())]
        [0.1]
    """

    def __init__(
        self, computer: GradientStatsComputer, step: int, weight_norms: Tensor | None = None
    ) -> None:
        self.computer = computer
        self.step = step
        with torch.no_grad():  # no per-tensor detach: nothing here is recorded
            self._before = _clone(computer.parameters)
            self._weight_norms = (
                weight_norms if weight_norms is not None else computer.flat_norms(self._before)
            )

    def measure(self) -> UpdateNorms:
        """Norms of the update the optimizer made since the snapshot (device tensors)."""
        with torch.no_grad():
            if self._before:  # the snapshot now holds -(update)
                torch._foreach_sub_(self._before, self.computer.parameters)
            update = self.computer.flat_norms(self._before)
        device = update.device
        norms = torch.stack([update.float(), self._weight_norms.float().to(device)])
        self._before = []
        return UpdateNorms(self.step, norms)


def _clone(tensors: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors``: one foreach call where the kernels allow it."""
    if tensors and plain_dense(tensors):
        return list(torch._foreach_clone(tensors))
    return [t.detach().clone() for t in tensors]
