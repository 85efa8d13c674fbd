"""``GradientGuard``: grad_guard in your own training loop (plain PyTorch or Lightning Fabric).

The Lightning callbacks hook ``on_before_optimizer_step``; a hand-written loop calls
:meth:`GradientGuard.step` at the same point, between ``loss.backward()`` and
``optimizer.step()``. Both are thin front ends over the same
:class:`~grad_guard.core.engine.StepEngine`. No Lightning import.
"""

from grad_guard.loop.guard import GradientGuard
from grad_guard.loop.result import GuardStep
from grad_guard.loop.unwrap import unwrap_model

__all__ = ["GradientGuard", "GuardStep", "unwrap_model"]
