"""What a forward hook needs to know: whether it runs in a backward pass, what to read.

Shared by the activation statistics (:mod:`grad_guard.core.activations`) and the
forward tracing after a NaN (:mod:`grad_guard.core.forward_origin`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass (checkpoint recompute).

    Example:
        >>> in_backward()
        False
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def first_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple, list or dict).

    Example:
        >>> first_tensor((torch.ones(2), None)).shape
        torch.Size([2])
    """
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)) or isinstance(output, dict):
        for value in values:
            found = first_tensor(value)
            if found is not None:
                return found
    return None
