"""grad_guard: keep deep-network training healthy.

Lightning callbacks that watch every layer's gradients at almost no cost, catch
vanishing, exploding and non-finite gradients the step they happen, clip adaptively,
and show it all in TensorBoard.

Names are imported lazily, so ``import grad_guard`` stays cheap and the pure-torch
core (``grad_guard.core``) never pulls in Lightning.

Example:
    >>> import grad_guard
    >>> grad_guard.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "GradientNormMonitor": "grad_guard.callbacks.monitor",
    "ActivationMonitor": "grad_guard.callbacks.activations",
    "GradientAnomalyDetection": "grad_guard.callbacks.detection",
    "AdaptiveGradientClipping": "grad_guard.callbacks.clipping",
    "GradientClipping": "grad_guard.callbacks.clipping",
    "AnomalyEvent": "grad_guard.core.events",
    "GradGuard": "grad_guard.callbacks.guard",
    "GradientAnomalyError": "grad_guard.core.detect",
    "NormClip": "grad_guard.core.clip",
    "ValueClip": "grad_guard.core.clip",
    "AutoClip": "grad_guard.core.clip",
    "ZClip": "grad_guard.core.clip",
    "AGC": "grad_guard.core.clip",
    "GradientStats": "grad_guard.core.stats",
    "compute_gradient_stats": "grad_guard.core.stats",
    "group_parameters": "grad_guard.core.layers",
    "GradientGuard": "grad_guard.loop",
    "GuardStep": "grad_guard.loop",
}

__all__ = [
    "AGC",
    "ActivationMonitor",
    "AdaptiveGradientClipping",
    "AnomalyEvent",
    "AutoClip",
    "GradGuard",
    "GradientAnomalyDetection",
    "GradientAnomalyError",
    "GradientClipping",
    "GradientGuard",
    "GradientNormMonitor",
    "GradientStats",
    "GuardStep",
    "NormClip",
    "ValueClip",
    "ZClip",
    "__version__",
    "compute_gradient_stats",
    "group_parameters",
]

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.callbacks.activations import ActivationMonitor
    from grad_guard.callbacks.clipping import AdaptiveGradientClipping, GradientClipping
    from grad_guard.callbacks.detection import GradientAnomalyDetection
    from grad_guard.callbacks.guard import GradGuard
    from grad_guard.callbacks.monitor import GradientNormMonitor
    from grad_guard.core.clip import AGC, AutoClip, NormClip, ValueClip, ZClip
    from grad_guard.core.detect import GradientAnomalyError
    from grad_guard.core.events import AnomalyEvent
    from grad_guard.core.layers import group_parameters
    from grad_guard.core.stats import GradientStats, compute_gradient_stats
    from grad_guard.loop import GradientGuard, GuardStep


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'grad_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
