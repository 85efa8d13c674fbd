"""Model inspection: what the report's advice needs to know about a model's structure.

:func:`inspect_model` walks ``named_modules()`` once and records activations,
normalization layers, depth, residual shortcuts and the scale of the initial weights.
With that the diagnosis can say "replace Sigmoid with ReLU" instead of "if the model
uses sigmoid...".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_SATURATING = ("Sigmoid", "Tanh", "Softsign", "Hardtanh", "Hardsigmoid", "LogSigmoid", "Tanhshrink")
_RELU_FAMILY = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "PReLU",
    "RReLU",
    "ELU",
    "SELU",
    "CELU",
    "GELU",
    "SiLU",
    "Mish",
    "Hardswish",
)
_NORM_PATTERN = re.compile(
    r"(BatchNorm|LayerNorm|GroupNorm|InstanceNorm|RMSNorm|LocalResponseNorm)"
)
_RESIDUAL_PATTERN = re.compile(
    r"(Residual|ResNet|ResBlock|PreAct|Bottleneck|TransformerEncoderLayer|TransformerDecoderLayer)"
)
# layer names that are normalization layers, for reports without a model
NORM_NAME = re.compile(r"(^|[._/])(bn|norm|ln|gn|layernorm|batchnorm|groupnorm)\w*$", re.IGNORECASE)
# std(w) * sqrt(fan_in) right after each init scheme (square layers, ReLU gain for He)
_INIT_SCALES = {"default": 1 / math.sqrt(3), "xavier": 1.0, "he": math.sqrt(2)}
MAX_SLOPE: dict[str, str] = {"Sigmoid": "0.25", "Hardsigmoid": "1/6", "LogSigmoid": "1"}


@dataclass
class ModelInfo:
    """What :func:`inspect_model` found in a model.

    Attributes:
        name: class name of the model.
        depth: number of weight layers (``Linear`` / ``Conv``).
        activations: activation module class name -> count.
        norm_layers: normalization module class name -> count.
        residual: whether shortcuts were found (a ``residual`` attribute, or block class
            names such as ``ResidualMLP``/``PreActBlock``/``Bottleneck``).
        convolutional: whether the model has convolutions.
        init: initialisation scheme named by the model (an ``init`` attribute), if any.
        weight_scale: median of ``std(W) * sqrt(fan_in)`` over weight layers (PyTorch's
            default init gives about 0.58, Xavier 1.0, He 1.41).
        weight_layers: module paths of the weight layers, forward order.
    """

    name: str
    depth: int
    activations: dict[str, int]
    norm_layers: dict[str, int]
    residual: bool
    convolutional: bool
    init: str | None
    weight_scale: float | None
    weight_layers: list[str] = field(default_factory=list)

    @property
    def saturating(self) -> list[str]:
        """Saturating activations present (sigmoid / tanh family)."""
        return [name for name in self.activations if name in _SATURATING]

    @property
    def relu_family(self) -> list[str]:
        return [name for name in self.activations if name in _RELU_FAMILY]

    def init_guess(self) -> str | None:
        """The init the weights look like (``init`` attribute first, then the scale)."""
        if self.init:
            return self.init
        if self.weight_scale is None:
            return None
        name, scale = min(
            _INIT_SCALES.items(), key=lambda kv: abs(math.log(self.weight_scale / kv[1]))
        )
        return name if abs(math.log(self.weight_scale / scale)) < math.log(1.2) else None

    def describe(self) -> str:
        parts = [f"{self.name}: {self.depth} weight layers"]
        acts = ", ".join(f"{n} x{c}" for n, c in self.activations.items()) or "none as modules"
        parts.append(f"activations {acts}")
        norms = ", ".join(f"{n} x{c}" for n, c in self.norm_layers.items()) or "none"
        parts.append(f"normalization {norms}")
        parts.append("residual shortcuts" if self.residual else "no residual shortcuts")
        if self.init_guess():
            parts.append(f"init {self.init_guess()}")
        return "; ".join(parts)


def inspect_model(model: Any) -> ModelInfo:
    """Look at a ``torch.nn.Module``'s structure: activations, norms, depth, shortcuts.

    Example:
        >>> from torch import nn
        >>> info = inspect_model(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
        >>> info.depth, info.saturating, info.residual
        (2, ['Sigmoid'], False)
    """
    from torch import nn

    activations: Counter[str] = Counter()
    norms: Counter[str] = Counter()
    residual_flags: list[bool] = []
    residual_names = False
    convolutional = False
    init = None
    scales = []
    weight_layers = []
    for path, module in model.named_modules():
        kind = type(module).__name__
        if kind in _SATURATING or kind in _RELU_FAMILY:
            activations[kind] += 1
        if _NORM_PATTERN.search(kind):
            norms[kind] += 1
        if isinstance(getattr(module, "residual", None), bool):
            residual_flags.append(module.residual)
        elif _RESIDUAL_PATTERN.search(kind):
            residual_names = True
        if init is None and isinstance(getattr(module, "init", None), str):
            init = module.init
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            convolutional |= isinstance(module, nn.modules.conv._ConvNd)
            weight_layers.append(path)
            weight = module.weight.detach()
            fan_in = weight[0].numel() if weight.dim() > 1 else 0
            if fan_in and weight.numel() > 1:
                scales.append(float(weight.float().std()) * math.sqrt(fan_in))
    residual = any(residual_flags) if residual_flags else residual_names
    return ModelInfo(
        name=type(model).__name__,
        depth=len(weight_layers),
        activations=dict(activations),
        norm_layers=dict(norms),
        residual=residual,
        convolutional=convolutional,
        init=init,
        weight_scale=float(np.median(scales)) if scales else None,
        weight_layers=weight_layers,
    )
