"""grad_guard inside TensorBoard: the "Gradients" dashboard plugin.

``pip install grad-guard`` registers the plugin with TensorBoard's ``tensorboard_plugins``
entry point; ``tensorboard --logdir DIR`` then shows a "Gradients" tab whenever a run has
grad_guard data. See :mod:`grad_guard.tensorboard.plugin` for its JSON routes.

The plugin classes are imported lazily, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GradGuardLoader", "GradGuardPlugin"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from grad_guard.tensorboard import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
