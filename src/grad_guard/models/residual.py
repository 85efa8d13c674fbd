"""A residual MLP with pre-activation blocks: the fix for the deep plain MLP."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from grad_guard.models.init import (
    ACTIVATIONS,
    INITS,
    init_weights,
    make_activation,
    validate_choice,
    validate_int,
)


class PreActBlock(nn.Module):
    """``x + linear(act(norm(x)))``: a pre-activation residual block (He et al., 2016).

    The identity path carries the gradient to earlier layers unchanged, whatever the
    branch does; BatchNorm keeps the branch's input at unit scale.

    Args:
        width: features in and out.
        activation: one of :data:`grad_guard.models.init.ACTIVATIONS`.

    Example:
        >>> import torch
        >>> PreActBlock(8)(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, width: int, activation: str = "relu") -> None:
        super().__init__()
        validate_int("width", width, 1)
        self.norm = nn.BatchNorm1d(width)
        self.act = make_activation(activation)
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(self.act(self.norm(x)))


class ResidualMLP(nn.Module):
    """Stem ``Linear``, ``depth - 2`` pre-activation residual blocks, BN + act, head.

    ``depth`` counts ``Linear`` layers exactly like :class:`~grad_guard.models.DeepMLP`'s,
    so ``ResidualMLP(depth=20)`` and ``DeepMLP(depth=20)`` have the same number of weight
    matrices of the same shapes; only the shortcuts and BatchNorm differ. Layers are named
    ``stem``, ``blocks.01.norm``, ``blocks.01.linear``, ..., ``norm``, ``head`` in forward
    order.

    Args:
        in_features: size of one flattened input.
        num_classes: number of output logits.
        depth: number of ``Linear`` layers, stem and head included (>= 2).
        width: units per block (>= 1).
        activation: ``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"leaky_relu"`` or ``"gelu"``.
        init: ``"he"`` (default), ``"xavier"`` or ``"default"``, see
            :func:`grad_guard.models.init_weights`.

    Raises:
        ValueError: if an argument is out of range or not one of the allowed names.

    Example:
        >>> import torch
        >>> model = ResidualMLP(64, 10, depth=4, width=8)
        >>> model(torch.randn(5, 64)).shape
        torch.Size([5, 10])
        >>> len(model.blocks)
        2
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int = 20,
        width: int = 64,
        activation: str = "relu",
        init: str = "he",
    ) -> None:
        super().__init__()
        validate_int("in_features", in_features, 1)
        validate_int("num_classes", num_classes, 1)
        validate_int("depth", depth, 2)
        validate_int("width", width, 1)
        validate_choice("activation", activation, ACTIVATIONS)
        validate_choice("init", init, INITS)

        num_blocks = depth - 2
        digits = len(str(max(num_blocks, 1)))
        self.flatten = nn.Flatten()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(
            OrderedDict(
                (f"{i:0{digits}d}", PreActBlock(width, activation))
                for i in range(1, num_blocks + 1)
            )
        )
        self.norm = nn.BatchNorm1d(width)
        self.act = make_activation(activation)
        self.head = nn.Linear(width, num_classes)

        self.depth = depth
        self.width = width
        self.activation = activation
        self.init = init
        if init != "default":
            init_weights(self, init, activation)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(self.flatten(x)))
        return self.head(self.act(self.norm(x)))

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, activation={self.activation!r}"
