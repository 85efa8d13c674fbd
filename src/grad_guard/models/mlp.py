"""A plain deep MLP: the textbook network for vanishing and exploding gradients."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from grad_guard.models.init import (
    ACTIVATIONS,
    INITS,
    init_weights,
    make_activation,
    validate_choice,
    validate_int,
)


class DeepMLP(nn.Sequential):
    """A stack of ``depth`` Linear layers with one activation between each, no shortcuts.

    Inputs of any shape ``(N, ...)`` are flattened first, so 8x8 digit images work as
    ``(N, 64)`` or ``(N, 1, 8, 8)``. The model is a flat :class:`torch.nn.Sequential`
    whose children are named ``fc01``, ``act01``, ``fc02``, ... ``head`` (zero-padded so
    that they sort in forward order): grad_guard reports one layer per ``Linear`` (plus
    one per BatchNorm when ``batch_norm=True``), first layer nearest the input.

    What it shows (150 SGD steps on digits, see :mod:`grad_guard.demo.experiments`):

    * ``activation="sigmoid", init="default"``: every layer multiplies the backward
      signal by ~0.14, so at ``depth=20`` the first layer's gradient is ~1e-16 of the
      last one's and the network does not learn (vanishing gradients).
    * ``activation="relu", init="he"``: gradients arrive at every layer with similar
      norms, but at a high learning rate the deep stack diverges (exploding gradients),
      which clipping fixes.

    Args:
        in_features: size of one flattened input.
        num_classes: number of output logits.
        depth: number of ``Linear`` layers, hidden layers plus the output head (>= 1).
        width: units per hidden layer (>= 1).
        activation: ``"sigmoid"``, ``"tanh"``, ``"relu"``, ``"leaky_relu"`` or ``"gelu"``.
        init: ``"default"`` (PyTorch's), ``"xavier"`` or ``"he"``, see
            :func:`grad_guard.models.init_weights`.
        batch_norm: put a ``BatchNorm1d`` between each hidden ``Linear`` and its activation.

    Raises:
        ValueError: if an argument is out of range or not one of the allowed names.

    Example:
        >>> import torch
        >>> model = DeepMLP(64, 10, depth=3, width=8, activation="relu", init="he")
        >>> model(torch.randn(5, 64)).shape
        torch.Size([5, 10])
        >>> [name for name, _ in model.named_children()]
        ['flatten', 'fc1', 'act1', 'fc2', 'act2', 'head']
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int = 20,
        width: int = 64,
        activation: str = "sigmoid",
        init: str = "default",
        batch_norm: bool = False,
    ) -> None:
        validate_int("in_features", in_features, 1)
        validate_int("num_classes", num_classes, 1)
        validate_int("depth", depth, 1)
        validate_int("width", width, 1)
        validate_choice("activation", activation, ACTIVATIONS)
        validate_choice("init", init, INITS)
        if not isinstance(batch_norm, bool):
            raise ValueError(f"`batch_norm` must be a bool, got {batch_norm!r}")

        digits = len(str(max(depth - 1, 1)))
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        features = in_features
        for index in range(1, depth):
            suffix = f"{index:0{digits}d}"
            layers[f"fc{suffix}"] = nn.Linear(features, width)
            if batch_norm:
                layers[f"bn{suffix}"] = nn.BatchNorm1d(width)
            layers[f"act{suffix}"] = make_activation(activation)
            features = width
        layers["head"] = nn.Linear(features, num_classes)
        super().__init__(layers)

        self.in_features = in_features
        self.num_classes = num_classes
        self.depth = depth
        self.width = width
        self.activation = activation
        self.init = init
        self.batch_norm = batch_norm
        if init != "default":
            init_weights(self, init, activation)

    def extra_repr(self) -> str:
        return (
            f"depth={self.depth}, width={self.width}, activation={self.activation!r}, "
            f"init={self.init!r}, batch_norm={self.batch_norm}"
        )
