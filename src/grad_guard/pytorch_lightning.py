"""grad_guard's callbacks for code that does ``import pytorch_lightning as pl``.

``lightning.pytorch`` and ``pytorch_lightning`` ship the same Trainer twice, under two
package names, and each Trainer accepts only *its own* ``Callback`` subclasses. The
callbacks in :mod:`grad_guard` derive from ``lightning.pytorch.Callback``; the classes
here are the same callbacks made acceptable to ``pytorch_lightning.Trainer``::

    import pytorch_lightning as pl
    from grad_guard.pytorch_lightning import GradGuard, ZClip

    trainer = pl.Trainer(callbacks=[GradGuard(clip=ZClip())])

Each class is built on first use as ``class X(grad_guard.X, pytorch_lightning.Callback)``
with an empty body: every hook, argument, default, docstring, ``state_key`` and
checkpoint format is the ``lightning`` class's, so behaviour cannot drift between the
two namespaces and a checkpoint written under one resumes under the other. Every other
public name of :mod:`grad_guard` (the clipping algorithms, ``GradientAnomalyError``...)
is re-exported unchanged, so one import line serves a ``pytorch_lightning`` project.

Nothing here is imported by ``import grad_guard``; importing this module imports
``pytorch_lightning`` (and ``lightning``, which the shared classes are built on).

Example:
    >>> import pytorch_lightning as pl
    >>> from grad_guard.pytorch_lightning import GradientNormMonitor
    >>> monitor = GradientNormMonitor(log_every_n_steps=10)
    >>> isinstance(monitor, pl.Callback)
    True
    >>> import grad_guard
    >>> isinstance(monitor, grad_guard.GradientNormMonitor)
    True
"""

from __future__ import annotations

import importlib
from typing import Any

import pytorch_lightning

import grad_guard

# public callback name -> module of its `lightning.pytorch` implementation
CALLBACKS: dict[str, str] = {
    "GradientNormMonitor": "grad_guard.callbacks.monitor",
    "GradientAnomalyDetection": "grad_guard.callbacks.detection",
    "AdaptiveGradientClipping": "grad_guard.callbacks.clipping",
    "GradientClipping": "grad_guard.callbacks.clipping",
    "GradGuard": "grad_guard.callbacks.guard",
    "ActivationMonitor": "grad_guard.callbacks.activations",
}

__all__ = sorted(set(CALLBACKS) | (set(grad_guard.__all__) - {"__version__"}))


def pytorch_lightning_callback(callback_class: type) -> type:
    """Return ``callback_class`` made a ``pytorch_lightning.Callback`` too.

    The subclass adds nothing but the second base class; it keeps the name (hence the
    ``state_key`` and the checkpoint entries) of ``callback_class``. Normally reached
    through this module's attributes, which also cache the class, so it is pickled by
    reference (``ddp_spawn``) and ``class_path: grad_guard.pytorch_lightning.X`` works in
    a ``pytorch_lightning.cli.LightningCLI`` config.

    Args:
        callback_class: a ``lightning.pytorch.Callback`` subclass.

    Example:
        >>> from grad_guard.callbacks.monitor import GradientNormMonitor
        >>> twin = pytorch_lightning_callback(GradientNormMonitor)
        >>> twin.__name__, issubclass(twin, pytorch_lightning.Callback)
        ('GradientNormMonitor', True)
    """
    name = callback_class.__name__
    note = (
        f"``pytorch_lightning`` twin of :class:`grad_guard.{name}` (same arguments and behaviour)."
    )
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        # the base docstring keeps its Args section, which LightningCLI's help shows
        "__doc__": f"{note}\n\n    {callback_class.__doc__ or ''}",
    }
    return type(name, (callback_class, pytorch_lightning.Callback), namespace)


def __getattr__(name: str) -> Any:
    if name in CALLBACKS:
        base = getattr(importlib.import_module(CALLBACKS[name]), name)
        value = pytorch_lightning_callback(base)
    elif name in grad_guard.__all__:
        value = getattr(grad_guard, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
