"""Exact per-layer facts, updated on every record (the history's columns are thinned)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LayerAggregate:
    """Exact running facts about one layer over every record (not decimated).

    Attributes:
        records: logged steps on which the layer was recorded.
        no_grad: records where the layer had no gradient at all (``grad is None``).
        zero: records where the gradient norm was exactly 0.
        nonfinite: records where the gradient norm was NaN or Inf.
        dead_streak: consecutive most recent records with a zero or missing gradient.
        min: smallest finite gradient norm (``inf`` until one is seen).
        max: largest finite gradient norm (``-inf`` until one is seen).
        last_grad_norm / last_param_norm / last_update_ratio: latest values (``None``
            until recorded).

    Example:
        >>> agg = LayerAggregate()
        >>> for value in (2.0, float("nan"), 0.0, None):
        ...     agg.add(value)
        >>> agg.records, agg.nonfinite, agg.zero, agg.no_grad, agg.dead_streak, agg.max
        (4, 1, 1, 1, 2, 2.0)
    """

    records: int = 0
    no_grad: int = 0
    zero: int = 0
    nonfinite: int = 0
    dead_streak: int = 0
    min: float = math.inf
    max: float = -math.inf
    last_grad_norm: float | None = None
    last_param_norm: float | None = None
    last_update_ratio: float | None = None

    def add(self, grad_norm: float | None) -> None:
        """Count one record of the layer (``None``: the layer had no gradient)."""
        self.records += 1
        self.last_grad_norm = grad_norm
        if grad_norm is None:
            self.no_grad += 1
            self.dead_streak += 1
        elif not math.isfinite(grad_norm):
            self.nonfinite += 1
            self.dead_streak = 0
        else:
            self.min = min(self.min, grad_norm)
            self.max = max(self.max, grad_norm)
            if grad_norm == 0.0:
                self.zero += 1
                self.dead_streak += 1
            else:
                self.dead_streak = 0
