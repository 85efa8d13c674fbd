"""Activations and weight initialisation for the reference models.

The two classic schemes differ only in the standard deviation they draw weights with:

* **Xavier / Glorot** (2010): ``std = gain * sqrt(2 / (fan_in + fan_out))``, keeps the
  variance of activations *and* gradients roughly constant through ``tanh``/``sigmoid``
  layers.
* **He / Kaiming** (2015): ``std = gain / sqrt(fan_in)``; with the ReLU gain
  ``sqrt(2)`` that is ``sqrt(2 / fan_in)``, which compensates ReLU zeroing half of its
  inputs.

``gain`` comes from :func:`torch.nn.init.calculate_gain` for the activation that follows
the layer (GELU, which that function does not know, uses the ReLU gain). PyTorch's own
default for ``nn.Linear``/``nn.Conv*`` (``"default"`` here) is
``kaiming_uniform_(a=sqrt(5))``, i.e. ``std = 1 / sqrt(3 * fan_in)``: too small for deep
stacks, which is how the 20-layer sigmoid MLP ends up with a first-layer gradient 1e-16
times the last one.

This module is pure torch (no Lightning), like the rest of :mod:`grad_guard.models`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from grad_guard._validation import check_int

Activation = Literal["sigmoid", "tanh", "relu", "leaky_relu", "gelu"]
Init = Literal["default", "xavier", "he"]

ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu")
"""Activation names the reference models accept."""

INITS: tuple[str, ...] = ("default", "xavier", "he")
"""Initialisation schemes :func:`init_weights` accepts."""

LEAKY_RELU_SLOPE = 0.01
"""Negative slope of ``"leaky_relu"`` (PyTorch's default)."""

_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def validate_choice(argument: str, value: object, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError``.

    Args:
        argument: the argument's name, used in the message.
        value: what the caller passed.
        allowed: the accepted strings.

    Raises:
        ValueError: naming ``argument``, ``value`` and ``allowed``.

    Example:
        >>> validate_choice("activation", "relu", ACTIVATIONS)
        'relu'
        >>> validate_choice("activation", "swish", ACTIVATIONS)
        Traceback (most recent call last):
        ...
        ValueError: `activation` must be one of 'sigmoid', 'tanh', 'relu', 'leaky_relu', 'gelu', got 'swish'
    """
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(choice) for choice in allowed)
        raise ValueError(f"`{argument}` must be one of {choices}, got {value!r}")
    return value


def validate_int(argument: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an ``int >= minimum``, else raise a ``ValueError``.

    Example:
        >>> validate_int("depth", 3, minimum=1)
        3
    """
    return check_int(argument, value, minimum)


def make_activation(activation: str) -> nn.Module:
    """Return a fresh activation module for ``activation``.

    Args:
        activation: one of :data:`ACTIVATIONS`.

    Raises:
        ValueError: if ``activation`` is not one of :data:`ACTIVATIONS`.

    Example:
        >>> make_activation("leaky_relu")
        LeakyReLU(negative_slope=0.01)
    """
    validate_choice("activation", activation, ACTIVATIONS)
    if activation == "sigmoid":
        return nn.Sigmoid()
    if activation == "tanh":
        return nn.Tanh()
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(LEAKY_RELU_SLOPE)
    return nn.GELU()


def activation_gain(activation: str) -> float:
    """The recommended init gain for ``activation`` (:func:`torch.nn.init.calculate_gain`).

    GELU is not known to ``calculate_gain``; it behaves like ReLU for positive inputs and
    gets the ReLU gain ``sqrt(2)``.

    Args:
        activation: one of :data:`ACTIVATIONS`.

    Raises:
        ValueError: if ``activation`` is not one of :data:`ACTIVATIONS`.

    Example:
        >>> round(activation_gain("relu"), 4), round(activation_gain("tanh"), 4)
        (1.4142, 1.6667)
    """
    validate_choice("activation", activation, ACTIVATIONS)
    if activation == "gelu":
        return nn.init.calculate_gain("relu")
    if activation == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", LEAKY_RELU_SLOPE)
    return nn.init.calculate_gain(activation)


def init_std(init: str, fan_in: int, fan_out: int, gain: float) -> float:
    """Standard deviation that scheme ``init`` ("xavier" or "he") draws weights with.

    Example:
        >>> init_std("he", fan_in=50, fan_out=10, gain=math.sqrt(2))
        0.2
    """
    validate_choice("init", init, ("xavier", "he"))
    if init == "he":
        return gain / math.sqrt(fan_in)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@torch.no_grad()
def init_weights(model: nn.Module, init: str = "he", activation: str = "relu") -> nn.Module:
    """Initialise every ``nn.Linear`` and ``nn.Conv*`` of ``model`` in place.

    Weights are drawn from a normal distribution with the scheme's standard deviation
    (see the module docstring), biases are set to zero. ``init="default"`` restores
    PyTorch's own initialisation (``reset_parameters()``, biases included). Other
    modules (BatchNorm, embeddings, ...) are left untouched. Works on any model.

    Args:
        model: the model to initialise.
        init: ``"he"`` (Kaiming, for ReLU-like activations), ``"xavier"`` (Glorot, for
            ``tanh``/``sigmoid``) or ``"default"``.
        activation: the activation that follows the layers, one of :data:`ACTIVATIONS`;
            it sets the gain.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: if ``init`` or ``activation`` is not one of the allowed names.

    Example:
        >>> layer = init_weights(nn.Linear(512, 512), "he", "relu")
        >>> round(layer.weight.std().item(), 2), layer.bias.abs().max().item()
        (0.06, 0.0)
    """
    validate_choice("init", init, INITS)
    gain = activation_gain(activation)
    for module in model.modules():
        if not isinstance(module, _WEIGHT_LAYERS):
            continue
        if init == "default":
            module.reset_parameters()
            continue
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
        module.weight.normal_(0.0, init_std(init, fan_in, fan_out, gain))
        if module.bias is not None:
            module.bias.zero_()
    return model


def weight_layer_names(model: nn.Module) -> list[str]:
    """Module paths of the ``nn.Linear``/``nn.Conv*`` layers of ``model``, definition order.

    Example:
        >>> weight_layer_names(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        ['0', '2']
    """
    return [name for name, module in model.named_modules() if isinstance(module, _WEIGHT_LAYERS)]
