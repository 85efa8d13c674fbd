"""The configurable parts a step engine runs: what to monitor and how to clip.

Anomaly detection's part is :class:`~grad_guard.core.policy.AnomalyPolicy`. Each part
holds its settings and the state that must survive a checkpoint; the engine holds what
belongs to one optimizer (passes, detectors, snapshots).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from grad_guard._validation import check_bool
from grad_guard.core.clip import ClipAlgorithm
from grad_guard.core.layers import Granularity, compile_patterns, validate_granularity
from grad_guard.core.stats import validate_norm_type


class MonitorPart:
    """What a logging step reports per layer.

    Args:
        granularity: how parameters form layers.
        norm_type: p of the logged norms.
        include: regexes; report only layers whose name matches one.
        exclude: regexes; do not report layers whose name matches one.
        log_param_norms: also report ``param_norm`` and ``grad_to_param``.
        log_update_ratio: also report ``update_ratio`` (copies the weights on logging
            steps).
        history: where logged host values are kept (anything with the methods of
            :class:`grad_guard.history.GradientHistory`), or ``None``.

    Raises:
        ValueError: if an argument is invalid; the message names it.
    """

    def __init__(
        self,
        granularity: Granularity = "module",
        norm_type: float | str = 2.0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
        history: Any = None,
    ) -> None:
        self.granularity = validate_granularity(granularity)
        self.norm_type = validate_norm_type(norm_type)
        self._include = compile_patterns("include", include)
        self._exclude = compile_patterns("exclude", exclude)
        self.log_param_norms = check_bool("log_param_norms", log_param_norms)
        self.log_update_ratio = check_bool("log_update_ratio", log_update_ratio)
        self.history = history

    def wanted(self, name: str) -> bool:
        """Whether layer ``name`` is reported (include/exclude)."""
        if self._include and not any(p.search(name) for p in self._include):
            return False
        return not any(p.search(name) for p in self._exclude)


class ClippingPart:
    """One clipping algorithm, with its own copy (and statistics) per optimizer.

    The first optimizer uses the object given; the others get fresh copies of it as it
    was built.

    Args:
        algorithm: the :class:`~grad_guard.core.clip.ClipAlgorithm`.
    """

    def __init__(self, algorithm: ClipAlgorithm) -> None:
        self.algorithm = algorithm
        self.template = copy.deepcopy(algorithm)
        self.algorithms: dict[Any, ClipAlgorithm] = {}
        self._pending: dict[Any, dict[str, Any]] = {}

    @property
    def granularity(self) -> Granularity:
        return self.algorithm.granularity

    @property
    def norm_type(self) -> float:
        return self.algorithm.norm_type

    def for_key(self, key: Any, first: bool) -> ClipAlgorithm:
        """The algorithm of optimizer ``key`` (``first``: the Trainer's first optimizer)."""
        algorithm = self.algorithms.get(key)
        if algorithm is None:
            algorithm = self.algorithm if first else copy.deepcopy(self.template)
            if key in self._pending:
                algorithm.load_state_dict(self._pending.pop(key))
            self.algorithms[key] = algorithm
        return algorithm

    @property
    def steps(self) -> int:
        """Optimizer steps clipped (or checked) so far, all optimizers together."""
        return sum(a.steps for a in self.algorithms.values())

    @property
    def clipped_fraction(self) -> float:
        """Fraction of all optimizer steps so far that were clipped (one host copy)."""
        steps = self.steps
        if not steps:
            return 0.0
        return sum(int(a.clipped_steps) for a in self.algorithms.values()) / steps

    def state_dict(self) -> dict[str, Any]:
        states = dict(self._pending)
        for key, algorithm in self.algorithms.items():
            states[key] = algorithm.state_dict()
        return {"algorithms": states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # forget what was learnt since construction (an LR finder restores a checkpoint
        # taken before any step): optimizers without saved state start fresh
        self.algorithm.load_state_dict(self.template.state_dict())
        self.algorithms = {}
        self._pending = dict(state.get("algorithms", {}))
