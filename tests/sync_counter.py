"""Count host-device synchronisations made from grad_guard code during a real fit."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import grad_guard

PACKAGE_DIR = os.path.dirname(os.path.abspath(grad_guard.__file__))
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _called_from_grad_guard() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return True
        frame = frame.f_back
    return False


@contextmanager
def count_host_syncs(step_of: Callable[[], int]) -> Iterator[Counter[int]]:
    """Patch the tensor-to-host methods; yield ``Counter{step: calls from grad_guard}``.

    ``step_of`` tells the current optimizer step when a call happens.
    """
    counts: Counter[int] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(original: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if _called_from_grad_guard():
                counts[step_of()] += 1
            return original(self, *args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(original))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
