"""Where a NaN was born: the first parameter, or the first module output, that was non-finite.

Gradient statistics name the layers whose *gradients* are non-finite, which for a NaN
born in the forward pass is every layer between the loss and the birthplace; the layer
named is the one nearest the loss. :class:`ForwardOriginTracer` names the cause:

1. :meth:`~ForwardOriginTracer.parameter_origin`: a non-finite parameter or buffer
   (``"parameter fc3.weight"``, ``"buffer bn.running_var"``), first in definition order.
   One packed host copy; call it only on a non-finite step.
2. Otherwise arm forward hooks (:meth:`~ForwardOriginTracer.arm`) for the *next*
   forward pass: that is what costs nothing and changes nothing (no extra forward, no
   RNG or BatchNorm side effects). Between arming and :meth:`~ForwardOriginTracer.disarm`
   every module records, on the device, whether its inputs and its output were finite;
   :attr:`~ForwardOriginTracer.origin` resolves them with one host copy:

   - the first module (in order of completion, so the innermost first) whose output is
     non-finite while its inputs were finite is where the NaN was born
     (``"blocks.3.attn"``);
   - if its inputs were already non-finite, the NaN was made by code between modules:
     the enclosing module that was running is named, or ``"input"`` when the model's
     own input carried it (a bad batch);
   - ``None`` when every module output was finite: the NaN was born after the forward
     (in the loss) or in the backward pass.

   :meth:`~ForwardOriginTracer.replay` runs a forward once more with the hooks armed
   (under ``no_grad``, buffers such as BatchNorm statistics restored and the global RNG
   untouched) for callers that still hold the batch and want an answer at once; dropout
   masks differ from the original pass.

Module names drop the wrapper components that layer names drop
(``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``), so they match. Calls
made during ``backward()`` (activation checkpointing recompute) are ignored. Hooks on
modules inside an already compiled ``torch.compile`` graph do not run (see
:mod:`grad_guard.core.activations`), so there the origin stays ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from grad_guard.core.activations import in_backward
from grad_guard.core.layers import _WRAPPER_COMPONENTS, ROOT_LAYER_NAME

INPUT_ORIGIN = "input"
"""Origin reported when the model's input already held the non-finite values."""

def _display_name(path: str) -> str:
    # the same names as grad_guard.core.layers gives the layers
    name = ".".join(part for part in path.split(".") if part not in _WRAPPER_COMPONENTS)
    return name or ROOT_LAYER_NAME


def _all_finite(values: Any) -> Tensor | None:
    """A 0-d bool device tensor: all floating tensors in ``values`` finite (``None``: none)."""
    flags = []
    stack = [values]
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            if value.is_floating_point() or value.is_complex():
                flags.append(torch.isfinite(value.detach()).all())
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (tuple, list)):
            stack.extend(value)
    if not flags:
        return None
    devices = {flag.device for flag in flags}
    device = flags[0].device
    if len(devices) > 1:
        flags = [flag.to(device) for flag in flags]
    return torch.stack(flags).all()


class _Call:
    __slots__ = ("inputs_ok", "name", "output_ok", "parent")

    def __init__(self, name: str, parent: _Call | None, inputs_ok: Tensor | None) -> None:
        self.name, self.parent, self.inputs_ok = name, parent, inputs_ok
        self.output_ok: Tensor | None = None


class ForwardOriginTracer:
    """Find the first parameter or module output that was non-finite.

    Args:
        model: the module to trace.

    Example:
        >>> class Log(nn.Module):
        ...     def forward(self, x):
        ...         return torch.log(x)
        >>> model = nn.Sequential(nn.Identity(), Log(), nn.Linear(2, 1))
        >>> tracer = ForwardOriginTracer(model)
        >>> tracer.parameter_origin() is None
        True
        >>> tracer.arm(); _ = model(torch.tensor([[-1.0, 2.0]])); tracer.disarm()
        >>> tracer.origin
        '1'
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._handles: list[Any] = []
        self._stack: list[_Call] = []
        self._done: list[_Call] = []
        self._origin: str | None = None
        self._resolved = True

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    @property
    def hook_count(self) -> int:
        return len(self._handles)

    def parameter_origin(self) -> str | None:
        """``"parameter <name>"`` / ``"buffer <name>"`` of the first non-finite one, or ``None``.

        Reads every parameter and floating buffer once on its device, then copies one
        flag per tensor to the host in one go (per device).
        """
        named = [("parameter", n, p) for n, p in self.model.named_parameters()]
        named += [("buffer", n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, tensor) in enumerate(named):
            by_device.setdefault(tensor.device, []).append(i)
        bad: list[int] = []
        for indices in by_device.values():
            flags = torch.stack([torch.isfinite(named[i][2].detach()).all() for i in indices])
            bad += [i for i, ok in zip(indices, flags.cpu().tolist()) if not ok]
        if not bad:
            return None
        kind, name, _ = named[min(bad)]
        return f"{kind} {_display_name(name)}"

    def arm(self) -> None:
        """Register a pre- and a post-forward hook on every module; forget the last trace."""
        if self._handles:
            return
        self._stack, self._done, self._origin, self._resolved = [], [], None, False
        for path, module in self.model.named_modules():
            name = _display_name(path)
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook()))

    def disarm(self) -> None:
        """Remove the hooks; the trace is kept for :attr:`origin`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stack = []

    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if in_backward():
                return
            parent = self._stack[-1] if self._stack else None
            self._stack.append(_Call(name, parent, _all_finite((args, kwargs))))

        return hook

    def _post_hook(self) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if in_backward() or not self._stack:
                return
            call = self._stack.pop()
            call.output_ok = _all_finite(output)
            self._done.append(call)

        return hook

    @property
    def origin(self) -> str | None:
        """Where the traced forward first produced a non-finite value (see module doc)."""
        if not self._resolved:
            self._origin = _resolve(self._done)
            self._done, self._resolved = [], True
        return self._origin

    def replay(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
        """Run ``forward(*args, **kwargs)`` once with the hooks armed; return the origin.

        Under ``torch.no_grad()``, with the model's buffers restored afterwards and the
        global RNG state forked, so training continues as if the replay never ran. A
        non-finite parameter is reported first, without replaying.
        """
        found = self.parameter_origin()
        if found is not None:
            return found
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = [t.device for _, t in buffers if t.device.type == "cuda"]
        self.arm()
        try:
            with torch.random.fork_rng(devices=sorted(set(devices), key=str)), torch.no_grad():
                forward(*args, **kwargs)
        finally:
            self.disarm()
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return self.origin


def _resolve(calls: list[_Call]) -> str | None:
    flags = [f for call in calls for f in (call.inputs_ok, call.output_ok) if f is not None]
    if not flags:
        return None
    device = flags[0].device
    host = iter(torch.stack([f.to(device) for f in flags]).cpu().tolist())
    ok: dict[int, bool] = {id(f): bool(next(host)) for f in flags}  # same order as flags

    def finite(flag: Tensor | None) -> bool:
        return flag is None or ok.get(id(flag), True)

    for call in calls:
        if not finite(call.output_ok):
            node: _Call | None = call
            while node is not None and not finite(node.inputs_ok):
                node = node.parent  # the values came in: blame the code that made them
            return INPUT_ORIGIN if node is None else node.name
    return None
