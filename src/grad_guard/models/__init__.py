"""Reference models that reproduce vanishing and exploding gradients, and their fixes.

* :class:`DeepMLP`: a plain stack of ``Linear`` + activation layers (sigmoid, tanh,
  ReLU, ...; PyTorch default, Xavier or He init; optional BatchNorm).
* :class:`ResidualMLP`: the same depth with pre-activation residual blocks + BatchNorm.
* :class:`ResNet`: a small CIFAR-style ResNet, or its plain twin with ``residual=False``.
* :func:`init_weights`: Xavier / He initialisation for any model.
* :class:`ImageClassifier`: a LightningModule (cross-entropy, accuracy, SGD/Adam) that
  trains any of them. It is the only part that imports Lightning, loaded on first use.

Example:
    >>> import torch
    >>> from grad_guard.models import DeepMLP, ResidualMLP
    >>> DeepMLP(64, 10, depth=4)(torch.randn(2, 64)).shape
    torch.Size([2, 10])
    >>> ResidualMLP(64, 10, depth=4)(torch.randn(2, 64)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from grad_guard.models.init import (
    ACTIVATIONS,
    INITS,
    activation_gain,
    init_weights,
    make_activation,
    weight_layer_names,
)
from grad_guard.models.mlp import DeepMLP
from grad_guard.models.residual import PreActBlock, ResidualMLP
from grad_guard.models.resnet import BasicBlock, ResNet

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.models.classifier import ImageClassifier

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "BasicBlock",
    "DeepMLP",
    "ImageClassifier",
    "PreActBlock",
    "ResNet",
    "ResidualMLP",
    "activation_gain",
    "init_weights",
    "make_activation",
    "weight_layer_names",
]


def __getattr__(name: str) -> Any:
    # ImageClassifier needs Lightning; keep `import grad_guard.models` pure torch.
    if name == "ImageClassifier":
        value = importlib.import_module("grad_guard.models.classifier").ImageClassifier
        globals()[name] = value
        return value
    raise AttributeError(f"module 'grad_guard.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
