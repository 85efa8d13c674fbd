"""Map a model's parameters to named layers.

A *layer* is the unit that grad_guard reports on: by default the module that directly
owns the parameters (a ``Linear``'s weight and bias form one layer named by the module
path, e.g. ``encoder.layers.0.linear1``). Layers keep the model's definition order,
which for ordinary models is forward order: the first layer is nearest the input and
the last nearest the loss.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
from torch import nn

Granularity = Literal["module", "parameter"] | int
"""``"module"`` (owning module), ``"parameter"`` (one layer per tensor) or an ``int`` N
(module path truncated to its first N components)."""


@dataclass(frozen=True)
class Layer:
    """A named group of parameters reported as one row.

    Attributes:
        name: display name, e.g. ``"encoder.0"``; ``"(root)"`` for parameters owned by
            the top-level module itself.
        param_names: fully qualified parameter names, in definition order.
        params: the parameter tensors, same order as ``param_names``.
    """

    name: str
    param_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]


ROOT_LAYER_NAME = "(root)"
_REQUIRES_GRAD = attrgetter("requires_grad")


def validate_granularity(granularity: Granularity) -> Granularity:
    """Return ``granularity`` or raise a ``ValueError`` that says what is allowed."""
    if isinstance(granularity, bool) or not (
        granularity in ("module", "parameter")
        or (isinstance(granularity, int) and granularity >= 1)
    ):
        raise ValueError(
            f"`granularity` must be 'module', 'parameter' or a positive int depth, "
            f"got {granularity!r}"
        )
    return granularity


def compile_patterns(argument: str, patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    """Compile include/exclude regexes, naming ``argument`` when they are invalid.

    Args:
        argument: the argument's name, for the message.
        patterns: ``None``, one regex string, or a list/tuple of regex strings.

    Raises:
        ValueError: for a dict, a set, an int, a non-string element or an invalid regex.

    Example:
        >>> [p.pattern for p in compile_patterns("include", "^enc")]
        ['^enc']
        >>> compile_patterns("include", 5)
        Traceback (most recent call last):
        ...
        ValueError: `include` must be a regex string, a list of regex strings or None, got 5
    """
    from grad_guard._validation import check_patterns  # the one rule for include/exclude

    return check_patterns(argument, patterns)


# Path components added by wrappers (FSDP1 units, activation checkpointing): left out of
# layer names, so a layer keeps the name it has in the unwrapped model.
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _layer_name(module_path: str, param_name: str, granularity: Granularity) -> str:
    if module_path and any(part in _WRAPPER_COMPONENTS for part in module_path.split(".")):
        module_path = ".".join(
            part for part in module_path.split(".") if part not in _WRAPPER_COMPONENTS
        )
    if granularity == "parameter":
        return f"{module_path}.{param_name}" if module_path else param_name
    if not module_path:
        return ROOT_LAYER_NAME
    if granularity == "module":
        return module_path
    return ".".join(module_path.split(".")[: int(granularity)])


def group_parameters(
    module: nn.Module,
    granularity: Granularity = "module",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    parameters: Iterable[torch.Tensor] | None = None,
) -> list[Layer]:
    """Group ``module``'s trainable parameters into named layers, in definition order.

    Tied (shared) parameters are counted once, under the first module that owns them.
    Frozen parameters (``requires_grad=False``) are left out.

    Args:
        module: the model.
        granularity: ``"module"`` groups by the owning module, ``"parameter"`` gives one
            layer per parameter tensor, an ``int`` N groups by the first N components of
            the module path (``2`` turns ``encoder.layers.0.linear1`` into
            ``encoder.layers``).
        include: regex (or list of them); keep only layers whose name matches one
            (``re.search``).
        exclude: regex (or list of them); drop layers whose name matches one.
        parameters: restrict to these tensors, e.g. one optimizer's parameters.

    Returns:
        The layers, first-defined first. Layers with no parameter left are omitted.

    Raises:
        ValueError: if ``granularity`` or a regex is invalid.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [layer.name for layer in group_parameters(model)]
        ['0', '2']
        >>> [layer.name for layer in group_parameters(model, "parameter")][:2]
        ['0.weight', '0.bias']
    """
    validate_granularity(granularity)
    include_patterns = compile_patterns("include", include)
    exclude_patterns = compile_patterns("exclude", exclude)
    allowed = None if parameters is None else {id(p) for p in parameters}

    seen: set[int] = set()
    grouped: dict[str, tuple[list[str], list[torch.Tensor]]] = {}
    for module_path, submodule in module.named_modules(remove_duplicate=False):
        for param_name, param in submodule.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            if allowed is not None and id(param) not in allowed:
                continue
            seen.add(id(param))
            name = _layer_name(module_path, param_name, granularity)
            names, params = grouped.setdefault(name, ([], []))
            names.append(f"{module_path}.{param_name}" if module_path else param_name)
            params.append(param)

    layers = []
    for name, (names, params) in grouped.items():
        if include_patterns and not any(p.search(name) for p in include_patterns):
            continue
        if any(p.search(name) for p in exclude_patterns):
            continue
        layers.append(Layer(name=name, param_names=tuple(names), params=tuple(params)))
    return layers


def optimizer_parameters(param_groups: Sequence[dict]) -> list[torch.Tensor]:
    """Every parameter of an optimizer's ``param_groups``, in order."""
    return [p for group in param_groups for p in group["params"]]


def parameters_signature(param_groups: Sequence[dict]) -> tuple:
    """What changes when parameters are unfrozen or a param group is added."""
    sizes = tuple(len(group["params"]) for group in param_groups)
    # called every step: map/attrgetter runs in C, a generator over 10k tensors does not
    trainable = sum(sum(map(_REQUIRES_GRAD, group["params"])) for group in param_groups)
    return sizes, trainable


def optimizer_layers(
    module: nn.Module, param_groups: Sequence[dict] | None, granularity: Granularity = "module"
) -> list[Layer]:
    """The layers of ``module`` an optimizer steps, plus the parameters it steps on its own.

    A parameter the optimizer steps but ``module`` does not own (``SGD(list(model.
    parameters()) + [extra])``) still gets checked: it becomes a layer of its own named
    ``param_groups.<g>.params.<i>``, after the module's layers.

    Args:
        module: the model.
        param_groups: the optimizer's ``param_groups``; ``None`` for all of ``module``'s
            trainable parameters.
        granularity: how the module's parameters form layers.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> extra = nn.Parameter(torch.zeros(3))
        >>> groups = torch.optim.SGD([*model.parameters(), extra], lr=0.1).param_groups
        >>> [layer.name for layer in optimizer_layers(model, groups)]
        ['(root)', 'param_groups.0.params.2']
    """
    if param_groups is None:
        return group_parameters(module, granularity)
    params = optimizer_parameters(param_groups)
    layers = group_parameters(module, granularity, parameters=params)
    owned = {id(p) for layer in layers for p in layer.params}
    owned.update(id(p) for p in module.parameters())  # frozen ones stay out on purpose
    for g, group in enumerate(param_groups):
        for i, param in enumerate(group["params"]):
            if id(param) in owned or not param.requires_grad:
                continue
            owned.add(id(param))
            name = f"param_groups.{g}.params.{i}"
            layers.append(Layer(name=name, param_names=(name,), params=(param,)))
    return layers
