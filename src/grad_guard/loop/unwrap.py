"""The user's model inside Fabric, DDP and ``torch.compile`` wrappers."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside Fabric, DDP (``.module``) and ``torch.compile`` wrappers.

    Example:
        >>> from torch import nn
        >>> inner = nn.Linear(2, 2)
        >>> unwrap_model(nn.DataParallel(inner)) is inner
        True
    """
    for _ in range(8):  # wrappers nest (Fabric around DDP around a compiled model)
        name = type(model).__name__
        if name in ("_FabricModule", "DistributedDataParallel", "DataParallel"):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model
