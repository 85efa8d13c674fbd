"""The :class:`GradientHistory` class (see :mod:`grad_guard.history`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grad_guard._validation import check_int
from grad_guard.history.aggregate import LayerAggregate
from grad_guard.history.events import event_to_dict

QUANTITIES: tuple[str, ...] = ("grad_norm", "param_norm", "update_ratio")
"""Per-layer quantities a history holds, one matrix each."""

COUNTER_NAMES: tuple[str, ...] = (
    "nonfinite",
    "exploding",
    "vanishing",
    "loss_spike",
    "amp_overflow",
    "skipped_steps",
    "rollbacks",
)
"""Counters the report totals (the names detection uses in its ``counts``)."""

# Norms and ratios are >= 0, so a negative number can mark "not recorded" inside a
# float array without a second mask array per column.
_MISSING = -1.0


class GradientHistory:
    """Per-layer gradient norms (and parameter norms, update ratios) per logged step.

    Args:
        max_steps: most columns (logged steps) kept; older ones are thinned evenly
            (>= 2).
        max_events: most events kept (the oldest are dropped; ``events_total`` keeps
            counting).

    Attributes:
        layers: layer names, forward order. steps: the logged steps of the kept
            columns (thinned). records: logged steps recorded (all of them).
        first_step / last_step: the first and last logged step recorded, exact
            whatever the thinning kept (``None`` before the first record).

    Raises:
        ValueError: if an argument is out of range.

    Example:
        >>> history = GradientHistory(max_steps=4)
        >>> for step in range(10):
        ...     history.record(step, ["fc1", "fc2"], [0.1 * (step + 1), 1.0])
        >>> history.layers, history.steps
        (['fc1', 'fc2'], [0, 4, 8])
        >>> history.matrix("grad_norm").shape
        (2, 3)
        >>> history.aggregates["fc1"].max  # exact, although step 9 was thinned away
        1.0
        >>> history.first_step, history.last_step
        (0, 9)
    """

    def __init__(self, max_steps: int = 512, max_events: int = 1000) -> None:
        self.max_steps = check_int("max_steps", max_steps, minimum=2)
        self.max_events = check_int("max_events", max_events, minimum=0)
        self.layers: list[str] = []
        self.steps: list[int] = []
        self.total_norms: list[float] = []
        self.aggregates: dict[str, LayerAggregate] = {}
        self.counts: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.clipped_fraction: float | None = None
        self.events: list[dict[str, Any]] = []
        self.events_total = 0
        self.meta: dict[str, Any] = {}
        self.records = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._stride = 1
        self._index: dict[str, int] = {}
        # quantity -> one float64 array per kept column, indexed like self.layers at the
        # time of the record (layers that appear later are padded on read)
        self._columns: dict[str, list[np.ndarray]] = {q: [] for q in QUANTITIES}

    # ------------------------------------------------------------------ recording
    def _layer_index(self, name: str) -> int:
        index = self._index.get(name)
        if index is None:
            index = self._index[name] = len(self.layers)
            self.layers.append(name)
            self.aggregates[name] = LayerAggregate()
        return index

    def _column(self, names: Sequence[str], values: Sequence[Any]) -> np.ndarray:
        indices = [self._layer_index(name) for name in names]
        column = np.full(len(self.layers), _MISSING)
        for index, value in zip(indices, values, strict=True):
            if value is not None:
                column[index] = value
        return column

    def record(
        self,
        step: int,
        layer_names: Sequence[str],
        grad_norms: Sequence[float],
        total_norm: float | None = None,
        param_norms: Sequence[float | None] | None = None,
        has_grad: Sequence[bool] | None = None,
    ) -> None:
        """Add one logged step (host floats; nothing here touches a device).

        Args:
            step: the logged step number.
            layer_names: layers in forward order (new names are appended to
                :attr:`layers`).
            grad_norms: gradient norm per layer.
            total_norm: norm over all layers, if known.
            param_norms: parameter norm per layer, if logged.
            has_grad: per layer, whether it had a gradient; ``False`` records the layer
                as "no gradient" (distinct from a zero norm).
        """
        present = list(has_grad) if has_grad is not None else [True] * len(layer_names)
        grads: list[float | None] = [
            float(g) if ok else None for g, ok in zip(grad_norms, present, strict=True)
        ]
        for name, value in zip(layer_names, grads, strict=True):
            self._layer_index(name)
            self.aggregates[name].add(value)
        if param_norms is not None:
            for name, value in zip(layer_names, param_norms, strict=True):
                if value is not None:
                    self.aggregates[name].last_param_norm = float(value)
        self.records += 1
        step = int(step)
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)

        if (self.records - 1) % self._stride:
            # not kept, but a NaN/Inf must not vanish from the picture with it
            if self._columns["grad_norm"]:
                _merge_nonfinite(self._columns["grad_norm"], -1, self._column(layer_names, grads))
            return
        self.steps.append(int(step))
        self.total_norms.append(math.nan if total_norm is None else float(total_norm))
        self._columns["grad_norm"].append(self._column(layer_names, grads))
        params = list(param_norms) if param_norms is not None else [None] * len(layer_names)
        self._columns["param_norm"].append(self._column(layer_names, params))
        self._columns["update_ratio"].append(np.full(len(self.layers), _MISSING))
        if len(self.steps) > self.max_steps:
            self._thin()

    def _thin(self) -> None:
        grads = self._columns["grad_norm"]
        for j in range(1, len(grads), 2):
            _merge_nonfinite(grads, j - 1, grads[j])
        self.steps = self.steps[::2]
        self.total_norms = self.total_norms[::2]
        for quantity in QUANTITIES:
            self._columns[quantity] = self._columns[quantity][::2]
        self._stride *= 2

    def record_update_ratios(
        self, step: int, layer_names: Sequence[str], ratios: Sequence[float]
    ) -> None:
        """Add ``||delta theta|| / ||theta||`` per layer for an already recorded ``step``."""
        for name, value in zip(layer_names, ratios, strict=True):
            self._layer_index(name)
            self.aggregates[name].last_update_ratio = float(value)
        if self.steps and self.steps[-1] == int(step):
            column = self._columns["update_ratio"][-1]
            if len(column) < len(self.layers):
                column = np.concatenate([column, np.full(len(self.layers) - len(column), _MISSING)])
            for name, value in zip(layer_names, ratios, strict=True):
                column[self._index[name]] = float(value)
            self._columns["update_ratio"][-1] = column

    def add_event(self, event: Any) -> None:
        """Keep an anomaly event (a dataclass or a mapping with ``step``, ``kind``, ...)."""
        self.events_total += 1
        if self.max_events == 0:
            return
        self.events.append(event_to_dict(event))
        if len(self.events) > self.max_events:
            del self.events[0]

    def update_counts(
        self, counts: Mapping[str, int | float], clipped_fraction: float | None = None
    ) -> None:
        """Set cumulative counters (e.g. detection's ``counts``) and the clipped fraction."""
        for key, value in counts.items():
            self.counts[key] = int(value)
        if clipped_fraction is not None:
            self.clipped_fraction = float(clipped_fraction)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.steps)

    def matrix(self, quantity: str = "grad_norm") -> np.ma.MaskedArray:
        """``[layers, steps]`` values, masked where not recorded (e.g. no gradient).

        NaN/Inf stay in the data (unmasked), so callers can tell non-finite from absent.
        """
        if quantity not in QUANTITIES:
            raise ValueError(f"`quantity` must be one of {QUANTITIES}, got {quantity!r}")
        data = np.full((len(self.layers), len(self.steps)), _MISSING)
        for j, column in enumerate(self._columns[quantity]):
            data[: len(column), j] = column
        return np.ma.masked_array(data, mask=data == _MISSING)

    def total_norm_array(self) -> np.ndarray:
        """Total gradient norm per kept column (NaN where unknown)."""
        return np.asarray(self.total_norms, dtype=float)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the history (plain Python and numpy)."""
        return {
            "max_steps": self.max_steps,
            "max_events": self.max_events,
            "layers": list(self.layers),
            "steps": list(self.steps),
            "total_norms": list(self.total_norms),
            # lists, not arrays: checkpoints load with ``weights_only=True``
            "columns": {q: self.matrix(q).filled(_MISSING).tolist() for q in QUANTITIES},
            "aggregates": {k: dataclasses.asdict(v) for k, v in self.aggregates.items()},
            "counts": dict(self.counts),
            "clipped_fraction": self.clipped_fraction,
            "events": list(self.events),
            "events_total": self.events_total,
            "meta": dict(self.meta),
            "records": self.records,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "stride": self._stride,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.max_steps = int(state.get("max_steps", self.max_steps))
        self.max_events = int(state.get("max_events", self.max_events))
        self.layers = list(state.get("layers", []))
        self._index = {name: i for i, name in enumerate(self.layers)}
        self.steps = [int(s) for s in state.get("steps", [])]
        self.total_norms = [float(v) for v in state.get("total_norms", [])]
        columns = state.get("columns", {})
        for quantity in QUANTITIES:
            data = np.asarray(columns.get(quantity, np.empty((len(self.layers), 0))), float)
            if data.shape != (len(self.layers), len(self.steps)):
                data = np.full((len(self.layers), len(self.steps)), _MISSING)
            self._columns[quantity] = [data[:, j].copy() for j in range(data.shape[1])]
        self.aggregates = {
            name: LayerAggregate(**state.get("aggregates", {}).get(name, {}))
            for name in self.layers
        }
        self.counts = {**dict.fromkeys(COUNTER_NAMES, 0), **state.get("counts", {})}
        self.clipped_fraction = state.get("clipped_fraction")
        self.events = list(state.get("events", []))
        self.events_total = int(state.get("events_total", len(self.events)))
        self.meta = dict(state.get("meta", {}))
        self.records = int(state.get("records", len(self.steps)))
        self.first_step = state.get("first_step", self.steps[0] if self.steps else None)
        self.last_step = state.get("last_step", self.steps[-1] if self.steps else None)
        self._stride = int(state.get("stride", 1))

    @classmethod
    def from_event_files(cls, logdir: str, max_steps: int = 512) -> GradientHistory:
        """Rebuild a history from the TensorBoard event files of one run.

        A shortcut for :func:`grad_guard.report.run_reader.read_run`, which also returns
        the run's configuration, its anomaly events and how much of each file was read.

        Args:
            logdir: a folder holding ``events.out.tfevents.*`` files directly, or a
                parent of run folders (then the run with the newest event file is read).
            max_steps: as in the constructor.

        Raises:
            FileNotFoundError: if ``logdir`` holds no event files.
        """
        from grad_guard.report.run_reader import newest_run, read_run

        return read_run(newest_run(logdir), max_steps=max_steps).history


def _merge_nonfinite(columns: list[np.ndarray], index: int, other: np.ndarray) -> None:
    """Copy ``other``'s NaN/Inf cells into ``columns[index]`` (peak-keeping decimation)."""
    bad = ~np.isfinite(other)
    if not bad.any():
        return
    column = columns[index]
    if len(column) < len(other):
        column = np.concatenate([column, np.full(len(other) - len(column), _MISSING)])
    column[: len(other)][bad] = other[bad]
    columns[index] = column
