"""Activation statistics from forward hooks that exist only while they are wanted.

What is measured, per *layer* (the same names as the gradient monitor: the modules that
own parameters, see :func:`grad_guard.core.layers.group_parameters`):

- ``mean``, ``std``, ``nonfinite_fraction`` of the layer module's own output (for a
  ``Linear`` the pre-activation). A layer with NaN/Inf outputs gets a non-finite mean and std; the
  non-finite fraction says how many.
- ``saturated_fraction`` of the output of the saturating activation module that follows
  the layer (``Sigmoid``, ``Hardsigmoid``: output ``< 1 - t`` or ``> t``; ``Tanh``,
  ``Softsign``: ``|y| > t``; ``Hardtanh(lo, hi)``: ``|y - mid| > t * half_range``;
  ``t = saturation_threshold``, 0.99 by default, where tanh' < 0.02 and sigmoid' is
  below 4 % of its peak).
- ``dead_fraction`` of the output of a ReLU-family activation (``ReLU``, ``ReLU6``,
  ``Hardswish``, ``Threshold``, whose output is exactly 0 on a flat region): the
  fraction of units that are 0 for every sample of the batch. A unit is one element
  of a sample (dim 0 is the batch): a feature of a ``Linear``, a (channel, position)
  of a conv. Leaky/soft variants (LeakyReLU, GELU, SiLU, ELU) never output a flat 0,
  so they get no dead fraction.

Attribution: an activation module's output belongs to the layer that completed last
before it ran (forward order, found at run time, so one shared ``nn.ReLU()`` instance
used after every layer is attributed correctly). With an int granularity N the layer
is the module at the truncated path (e.g. ``blocks.3``): its own output is the block's
output, and activations inside it belong to it. Activations that run before any layer
are not reported. Activations applied as functions (``F.relu``) are not modules and
cannot be hooked: only the layer outputs are then measured.

Cost: hooks are registered by :meth:`ActivationHooks.arm` and removed by
:meth:`~ActivationHooks.disarm`, so between logging steps no hook exists. Inside a hook
everything stays on the device (a few reductions, no ``.item()``); :meth:`~ActivationHooks.read`
copies one packed tensor per device to the host.

Activation checkpointing: ``torch.utils.checkpoint`` recomputes the forward inside
``backward()`` (both ``use_reentrant`` variants; grad mode is *on* there), which calls
the hooks again. Calls made while the autograd engine runs a backward pass are
skipped, so nothing is counted twice.

``torch.compile`` (dynamo, any backend): under the default
``torch._dynamo.config.skip_nnmodule_hook_guards = True`` dynamo does not guard on hooks
it has not traced. Hooks present at the first compilation are traced into the graph, and
removing them triggers one recompilation without them; hooks added to an already
compiled graph never run, so :meth:`ActivationHooks.read` returns nothing (the callback
warns). Set it to ``False`` to measure a compiled model: dynamo then compiles the hooked
and the unhooked variant once each and switches between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from grad_guard._validation import check_float
from grad_guard.core.activation_stats import LayerActivations, combine_rows
from grad_guard.core.forward_hooks import first_tensor, in_backward
from grad_guard.core.layers import ROOT_LAYER_NAME, Granularity, group_parameters

__all__ = [
    "RELU_FAMILY",
    "SATURATING",
    "ActivationHooks",
    "LayerActivations",
    "first_tensor",
    "in_backward",
]

# (low, high) bounds of sigmoid-like and tanh-like outputs; Hardtanh reads its own
_SIGMOID_LIKE: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
_TANH_LIKE: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Softsign, nn.Hardtanh)
SATURATING: tuple[type[nn.Module], ...] = _SIGMOID_LIKE + _TANH_LIKE
"""Activation modules that get a ``saturated_fraction`` (``ReLU6`` is a ``Hardtanh``
subclass but belongs to :data:`RELU_FAMILY`)."""
RELU_FAMILY: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Threshold)
"""Activation modules that get a ``dead_fraction``."""


def _saturation_limits(module: nn.Module, threshold: float) -> tuple[float, float]:
    """``(mid, limit)``: an output ``y`` is saturated when ``|y - mid| > limit``."""
    if isinstance(module, _SIGMOID_LIKE):
        return 0.5, threshold - 0.5
    if isinstance(module, nn.Hardtanh):
        low, high = float(module.min_val), float(module.max_val)
        return (low + high) / 2, threshold * (high - low) / 2
    return 0.0, threshold


class ActivationHooks:
    """Forward hooks that measure per-layer activation statistics while armed.

    Args:
        model: the module to watch (its structure is read once, here).
        granularity: ``"module"`` or an int N, as for the gradient monitor
            (``"parameter"`` is refused: activations belong to modules).
        include: regex or list of them; keep only matching layer names.
        exclude: regex or list of them; drop matching layer names.
        saturation_threshold: ``t`` in the saturation rule (see the module docstring),
            in ``(0.5, 1)``.

    Raises:
        ValueError: if an argument is invalid (names it).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> hooks = ActivationHooks(model)
        >>> hooks.arm(); _ = model(torch.randn(16, 4)); hooks.disarm()
        >>> stats = hooks.read()
        >>> sorted(stats), stats["0"].activation, hooks.hook_count
        (['0', '2'], 'ReLU', 0)
    """

    def __init__(
        self,
        model: nn.Module,
        granularity: Granularity = "module",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        saturation_threshold: float = 0.99,
    ) -> None:
        if granularity == "parameter":
            raise ValueError(
                "`granularity` must be 'module' or a positive int depth for activation "
                "statistics (activations belong to modules, not parameter tensors), got "
                "'parameter'"
            )
        layers = group_parameters(model, granularity, include, exclude)
        self.saturation_threshold = check_float(
            "saturation_threshold", saturation_threshold, 0.5, 1.0,
            inclusive_min=True, inclusive_max=False,
        )  # fmt: skip
        self.layer_names: list[str] = [layer.name for layer in layers]
        index = {name: i for i, name in enumerate(self.layer_names)}
        owner = {id(p): layer.name for layer in layers for p in layer.params}
        paths = dict(model.named_modules())
        # module -> layer index; None marks a module that owns parameters but is not
        # reported (frozen, excluded): activations after it must not be given to the
        # layer before it
        self._layers: list[tuple[nn.Module, int | None]] = []
        self._activations: list[tuple[nn.Module, int | None]] = []  # fixed layer or None
        activation_types = SATURATING + RELU_FAMILY
        if granularity == "module":
            for module in paths.values():
                own = list(module.parameters(recurse=False))
                names = {owner[id(p)] for p in own if id(p) in owner}
                if own:
                    self._layers.append((module, index[names.pop()] if names else None))
                elif isinstance(module, activation_types):
                    self._activations.append((module, None))
        else:
            for name in self.layer_names:
                module = model if name == ROOT_LAYER_NAME else paths.get(name)
                if module is not None:
                    self._layers.append((module, index[name]))
            for path, module in paths.items():
                prefix = ".".join(path.split(".")[: int(granularity)])
                if isinstance(module, activation_types) and prefix in index:
                    self._activations.append((module, index[prefix]))
        self._handles: list[Any] = []
        self._last_layer: int | None = None
        # per hook call: (layer index, kind, weight, activation name, device tensor)
        self._rows: list[tuple[int, str, int, str | None, Tensor]] = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    @property
    def hook_count(self) -> int:
        """How many hooks this object has registered right now (0 when disarmed)."""
        return len(self._handles)

    def arm(self) -> None:
        """Register the hooks (idempotent) and forget what the previous arming measured."""
        if self._handles:
            return
        self._rows = []
        self._last_layer = None
        for module, layer in self._layers:
            self._handles.append(module.register_forward_hook(self._layer_hook(layer)))
        for module, layer in self._activations:
            self._handles.append(module.register_forward_hook(self._activation_hook(layer)))

    def disarm(self) -> None:
        """Remove every hook; what was measured stays until :meth:`read`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _layer_hook(self, layer: int | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.compiler.is_compiling() and in_backward():
                return  # checkpoint recompute: already counted in the forward
            self._last_layer = layer
            out = first_tensor(output)
            if layer is None or out is None or out.numel() == 0:
                return
            with torch.no_grad():
                # plain float reductions: several times cheaper on CPU than var_mean or
                # boolean masks, and as exact (the norm is taken about the mean)
                out = out.detach().float()
                mean = out.mean()
                spread = torch.linalg.vector_norm(out - mean)  # sqrt(n * var)
                # inf * 0 and nan * 0 are NaN: a count of non-finite elements
                nonfinite = torch.nan_to_num(out * 0.0, nan=1.0).sum()
                row = torch.stack([mean, spread, nonfinite])
            self._rows.append((layer, "output", out.numel(), None, row))

        return hook

    def _activation_hook(self, fixed_layer: int | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.compiler.is_compiling() and in_backward():
                return
            layer = self._last_layer if fixed_layer is None else fixed_layer
            out = first_tensor(output)
            if layer is None or out is None or out.numel() == 0:
                return
            with torch.no_grad():
                out = out.detach()
                if isinstance(module, SATURATING) and not isinstance(module, nn.ReLU6):
                    mid, limit = _saturation_limits(module, self.saturation_threshold)
                    kind, weight = "saturated", out.numel()
                    centred = out.float() - mid if mid else out.float()
                    value = torch.count_nonzero(centred.abs().sub_(limit).clamp_min_(0.0))
                else:
                    kind = "dead"
                    flat = out.reshape(out.shape[0], -1) if out.dim() else out.reshape(1, 1)
                    peak = flat.abs().amax(dim=0)  # 0 only if 0 for every sample
                    weight = peak.numel()
                    value = weight - torch.count_nonzero(peak)
            row = value.reshape(1).float()
            self._rows.append((layer, kind, weight, type(module).__name__, row))

        return hook

    def read(self) -> dict[str, LayerActivations]:
        """This arming's statistics per layer, forward order; one host copy per device.

        Several calls of one layer (a shared module, several activations after one
        layer) are combined, weighted by their element (or unit) counts. Clears the
        measurements.
        """
        rows, self._rows = self._rows, []
        if not rows:
            return {}
        by_device: dict[torch.device, list[int]] = {}
        for i, row in enumerate(rows):
            by_device.setdefault(row[4].device, []).append(i)
        host: list[list[float]] = [[] for _ in rows]
        for indices in by_device.values():
            packed = torch.cat([rows[i][4] for i in indices]).cpu().tolist()
            offset = 0
            for i in indices:
                width = rows[i][4].numel()
                host[i] = packed[offset : offset + width]
                offset += width
        return combine_rows(self.layer_names, rows, host)
