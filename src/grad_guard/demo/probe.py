"""Gradient measurements of the demo that need no training loop.

* :func:`probe_gradients`: one forward/backward pass on a copy of a model; the gradient
  norm of every layer and the first/last weight-layer ratio (``<< 1``: vanishing).
* :func:`evaluate`: accuracy and cross-entropy on a whole dataset.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import compute_gradient_stats
from grad_guard.models import weight_layer_names


@dataclass
class GradientProbe:
    """Per-layer gradient norms of one forward/backward pass.

    Attributes:
        layer_norms: gradient norm of each layer (grad_guard's layer grouping).
        first_layer: the weight layer (``Linear``/``Conv``) nearest the input.
        last_layer: the weight layer nearest the loss.
        ratio: ``norm(first_layer) / norm(last_layer)``; ``<< 1`` means vanishing,
            ``>> 1`` exploding towards the input.
        loss: the loss of the pass.
    """

    layer_norms: dict[str, float]
    first_layer: str
    last_layer: str
    ratio: float
    loss: float


def probe_gradients(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> GradientProbe:
    """One forward/backward pass on a copy of ``model``; the gradient norms per layer.

    The model itself is left untouched (gradients, BatchNorm running statistics): the
    pass runs on a deep copy in training mode. Norms come from
    :func:`grad_guard.core.layers.group_parameters` and
    :func:`grad_guard.core.stats.compute_gradient_stats`; the ratio compares the first and
    last ``Linear``/``Conv`` layers (normalization layers are skipped; a model without
    either compares its first and last layers).

    Args:
        model: the model.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, cross-entropy by default.

    Example:
        >>> from grad_guard.models import DeepMLP
        >>> torch.manual_seed(0) and None
        >>> probe = probe_gradients(DeepMLP(64, 10, depth=20), (torch.randn(32, 64),
        ...                         torch.randint(0, 10, (32,))))
        >>> probe.first_layer, probe.last_layer, probe.ratio < 1e-6
        ('fc01', 'head', True)
    """
    probe = copy.deepcopy(model)
    probe.train()
    probe.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss = loss_fn(probe(inputs), targets)
    loss.backward()
    stats = compute_gradient_stats(group_parameters(probe))
    norms = stats.to_dict()
    weight_layers = set(weight_layer_names(probe))
    names = [name for name in norms if name in weight_layers] or list(norms)
    if not names:
        raise ValueError("`model` has no parameter that received a gradient")
    first, last = names[0], names[-1]
    last_norm = norms[last]
    if last_norm > 0:
        ratio = norms[first] / last_norm
    else:
        ratio = math.inf if norms[first] > 0 else math.nan
    return GradientProbe(norms, first, last, ratio, float(loss.detach()))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on the whole dataset.

    Example:
        >>> from grad_guard.demo.data import synthetic_dataset
        >>> accuracy, loss = evaluate(nn.Linear(64, 10), synthetic_dataset(n_samples=50))
        >>> 0.0 <= accuracy <= 1.0 and loss > 0
        True
    """
    was_training = model.training
    model.eval()
    try:
        inputs, targets = dataset.tensors
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    finally:
        model.train(was_training)
    return accuracy, loss
