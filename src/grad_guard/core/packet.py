"""Many device tensors, one device-to-host copy.

A step that reports anything (detection flags, norms, clip figures, update ratios)
concatenates them into one flat float tensor, copies it once, and slices the host list.

Example:
    >>> import torch
    >>> packet = HostPacket()
    >>> packet.add("norms", torch.tensor([1.0, 2.0]))
    >>> packet.add("total", torch.tensor(3.0))
    >>> values = packet.read()
    >>> values["norms"], values["total"]
    ([1.0, 2.0], [3.0])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class HostPacket:
    """Named device tensors gathered for one copy to the host."""

    def __init__(self) -> None:
        self._parts: list[tuple[str, Tensor]] = []

    def add(self, name: str, tensor: Tensor) -> None:
        """Queue ``tensor`` (any shape; flattened, as float) under ``name``."""
        self._parts.append((name, tensor.detach().reshape(-1)))

    def __bool__(self) -> bool:
        return bool(self._parts)

    def read(
        self, reduce: dict[str, Callable[[Tensor], Tensor]] | None = None
    ) -> dict[str, list[float]]:
        """Copy everything to the host at once; ``reduce`` maps a name to a collective."""
        if not self._parts:
            return {}
        device = self._parts[0][1].device
        parts = []
        for name, tensor in self._parts:
            if reduce and name in reduce:
                tensor = reduce[name](tensor)
            parts.append(tensor.to(device=device, dtype=_wire_dtype(device)))
        flat = torch.cat(parts).tolist()  # the one host copy
        values: dict[str, list[float]] = {}
        offset = 0
        for (name, tensor), _ in zip(self._parts, parts):
            values[name] = flat[offset : offset + tensor.numel()]
            offset += tensor.numel()
        self._parts = []
        return values


def _wire_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps counts and float64 norms exact; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64
