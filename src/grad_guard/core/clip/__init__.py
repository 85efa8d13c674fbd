"""Gradient clipping algorithms, pure torch (no Lightning), one per module.

* :class:`NormClip`: a fixed bound on the global norm (``clip_grad_norm_``) or, with
  ``per_parameter=True``, on each tensor's norm (Keras ``clipnorm``).
* :class:`ValueClip`: clamp each element (``clip_grad_value_``).
* :class:`AutoClip`: clip to a percentile of the recent norms (Seetharaman et al. 2020).
* :class:`ZClip`: clip z-score outliers against an EMA of the norm (Kumar et al. 2025).
* :class:`AGC`: unit-wise bound relative to the weights (Brock et al. 2021).

All share :class:`ClipAlgorithm`: ``clipper(model)`` in a plain loop returns the
pre-clip total norm; ``clipper.clip_stats(stats)`` clips from a statistics pass already
made; ``state_dict()`` / ``load_state_dict()`` carry the statistics over a resume.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> clip = ZClip()
    >>> norm = clip(model)  # between loss.backward() and optimizer.step()
    >>> norm.shape, clip.steps
    (torch.Size([]), 1)
"""

from grad_guard.core.clip.agc import AGC, Unit, unit_layout, unitwise_norm
from grad_guard.core.clip.autoclip import AutoClip, nan_percentile
from grad_guard.core.clip.base import ClipAlgorithm, ClipResult, norm_coefficient, scale_grads_
from grad_guard.core.clip.norm import NormClip
from grad_guard.core.clip.shortcuts import SHORTCUTS, ClipShortcut, resolve_algorithm
from grad_guard.core.clip.value import ValueClip
from grad_guard.core.clip.zclip import ZClip

__all__ = [
    "AGC",
    "SHORTCUTS",
    "AutoClip",
    "ClipAlgorithm",
    "ClipResult",
    "ClipShortcut",
    "NormClip",
    "Unit",
    "ValueClip",
    "ZClip",
    "nan_percentile",
    "norm_coefficient",
    "resolve_algorithm",
    "scale_grads_",
    "unit_layout",
    "unitwise_norm",
]
