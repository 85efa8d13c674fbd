"""Activation statistics on the host: tag names, and a bounded history of logged steps.

:class:`ActivationHistory` keeps what :class:`~grad_guard.core.activations.ActivationHooks`
returned on each logging step (host floats, no device access), for the heatmap of
activation std, the diagnosis rules and checkpoints. It can be rebuilt from logged
scalars with :meth:`ActivationHistory.from_scalars`, so ``grad-guard report LOGDIR``
can diagnose a finished run from its event files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from grad_guard._validation import check_int
from grad_guard.core.activations import LayerActivations

TAGS: dict[str, str] = {
    "mean": "activation_mean",
    "std": "activation_std",
    "saturated_fraction": "saturated_fraction",
    "dead_fraction": "dead_fraction",
    "nonfinite_fraction": "nonfinite_fraction",
}
"""Field of :class:`LayerActivations` -> tag prefix (``<prefix>/<layer>``)."""
QUANTITIES: tuple[str, ...] = tuple(TAGS)


def activation_metrics(stats: Mapping[str, LayerActivations], label: str = "") -> dict[str, float]:
    """The scalars of one logging step, ``<prefix>/<layer>`` (fractions only where measured).

    Args:
        stats: layer -> statistics, as :meth:`ActivationHooks.read` returns them.
        label: an extra level after the prefix (e.g. ``"optimizer_1"``), or ``""``.

    Example:
        >>> activation_metrics({"fc": LayerActivations(0.0, 1.0, 0.0, dead_fraction=0.5)})
        {'activation_mean/fc': 0.0, 'activation_std/fc': 1.0, 'dead_fraction/fc': 0.5, 'nonfinite_fraction/fc': 0.0}
    """
    metrics = {}
    for name, layer in stats.items():
        for field, prefix in TAGS.items():
            value = getattr(layer, field)
            if value is not None:
                metrics[f"{prefix}/{label}/{name}" if label else f"{prefix}/{name}"] = value
    return metrics


class ActivationHistory:
    """Per-layer activation statistics per logged step, at most ``max_steps`` columns.

    When full, every other column is dropped and from then on only every second record
    is kept, so the columns stay evenly spread over the run.

    Args:
        max_steps: most logged steps kept (>= 2).

    Raises:
        ValueError: if ``max_steps`` is not an int >= 2.

    Example:
        >>> history = ActivationHistory()
        >>> history.record(0, {"fc1": LayerActivations(0.0, 2.0, 0.0), "fc2": LayerActivations(0.0, 6.0, 0.0)})
        >>> history.layers, history.steps, history.matrix("std").tolist()
        (['fc1', 'fc2'], [0], [[2.0], [6.0]])
    """

    def __init__(self, max_steps: int = 512) -> None:
        self.max_steps = check_int("max_steps", max_steps, minimum=2)
        self.layers: list[str] = []
        self.steps: list[int] = []
        self.activation: dict[str, str] = {}  # layer -> activation class measured after it
        self.records = 0
        self._stride = 1
        self._columns: list[dict[str, LayerActivations]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def record(self, step: int, stats: Mapping[str, LayerActivations]) -> None:
        """Add one logged step (host values)."""
        for name, layer in stats.items():
            if name not in self.activation:
                self.layers.append(name)
                self.activation[name] = layer.activation or ""
            elif layer.activation and not self.activation[name]:
                self.activation[name] = layer.activation
        self.records += 1
        if (self.records - 1) % self._stride:
            return
        self.steps.append(int(step))
        self._columns.append(dict(stats))
        if len(self.steps) > self.max_steps:
            self.steps, self._columns = self.steps[::2], self._columns[::2]
            self._stride *= 2

    def matrix(self, quantity: str) -> np.ndarray:
        """``layers x steps`` float array of one quantity; NaN where not measured.

        Raises:
            ValueError: if ``quantity`` is not one of :data:`QUANTITIES`.
        """
        if quantity not in TAGS:
            raise ValueError(f"`quantity` must be one of {', '.join(QUANTITIES)}, got {quantity!r}")
        data = np.full((len(self.layers), len(self.steps)), np.nan)
        for j, column in enumerate(self._columns):
            for i, name in enumerate(self.layers):
                layer = column.get(name)
                value = None if layer is None else getattr(layer, quantity)
                if value is not None:
                    data[i, j] = value
        return data

    def summary(self, window: int = 20) -> dict[str, LayerActivations]:
        """Per layer, the median of each quantity over the last ``window`` kept steps.

        Non-finite values are left out of the medians of mean and std (the
        ``nonfinite_fraction`` median says how often they occurred).
        """
        window = check_int("window", window)
        matrices = {quantity: self.matrix(quantity)[:, -window:] for quantity in QUANTITIES}
        result = {}
        for i, name in enumerate(self.layers):
            values: dict[str, float | None] = {}
            for quantity in QUANTITIES:
                row = matrices[quantity][i]
                row = row[np.isfinite(row)]
                values[quantity] = float(np.median(row)) if row.size else None
            if values["mean"] is None and values["std"] is None and not any(
                values[q] is not None for q in ("saturated_fraction", "dead_fraction")
            ):
                continue
            result[name] = LayerActivations(
                mean=math.nan if values["mean"] is None else values["mean"],
                std=math.nan if values["std"] is None else values["std"],
                nonfinite_fraction=values["nonfinite_fraction"] or 0.0,
                saturated_fraction=values["saturated_fraction"],
                dead_fraction=values["dead_fraction"],
                activation=self.activation.get(name) or None,
            )
        return result

    @classmethod
    def from_scalars(
        cls,
        scalars: Mapping[str, Mapping[int, float]],
        layers: Sequence[str] | None = None,
        max_steps: int = 512,
    ) -> ActivationHistory:
        """Rebuild a history from ``{tag: {step: value}}`` (e.g. read from event files).

        Tags other than the five activation prefixes are ignored.

        Args:
            scalars: tag -> step -> value.
            layers: the layers in forward order (e.g. a gradient history's
                ``layers``); layers not listed follow in the order their tags come.
            max_steps: as for the constructor.

        Example:
            >>> h = ActivationHistory.from_scalars({"activation_std/fc": {0: 1.0, 5: 2.0}})
            >>> h.steps, h.matrix("std").tolist()
            ([0, 5], [[1.0, 2.0]])
        """
        per_step: dict[int, dict[str, dict[str, float]]] = {}
        prefixes = {prefix: field for field, prefix in TAGS.items()}
        for tag, values in scalars.items():
            prefix, _, name = tag.partition("/")
            if prefix not in prefixes or not name:
                continue
            for step, value in values.items():
                per_step.setdefault(int(step), {}).setdefault(name, {})[prefixes[prefix]] = value
        history = cls(max_steps=max_steps)
        seen = {name for fields in per_step.values() for name in fields}
        order = [n for n in (layers or []) if n in seen]
        order += [n for n in dict.fromkeys(n for s in sorted(per_step) for n in per_step[s]) if n not in order]
        history.layers = order
        history.activation = dict.fromkeys(order, "")
        for step in sorted(per_step):
            history.record(
                step,
                {
                    name: LayerActivations(
                        mean=fields.get("mean", math.nan),
                        std=fields.get("std", math.nan),
                        nonfinite_fraction=fields.get("nonfinite_fraction", 0.0),
                        saturated_fraction=fields.get("saturated_fraction"),
                        dead_fraction=fields.get("dead_fraction"),
                    )
                    for name, fields in per_step[step].items()
                },
            )
        return history

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            "max_steps": self.max_steps,
            "records": self.records,
            "stride": self._stride,
            "layers": list(self.layers),
            "activation": dict(self.activation),
            "steps": list(self.steps),
            "columns": [{n: asdict(v) for n, v in c.items()} for c in self._columns],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.records = int(state.get("records", 0))
        self._stride = int(state.get("stride", 1))
        self.layers = list(state.get("layers", []))
        self.activation = dict(state.get("activation", {}))
        self.steps = [int(s) for s in state.get("steps", [])]
        self._columns = [
            {n: LayerActivations(**v) for n, v in c.items()} for c in state.get("columns", [])
        ]
