"""``GradientHistory``: what the end-of-fit report and the pictures are drawn from.

The monitor already copies one small packed tensor of norms to the host on each logging
step; the history keeps those host floats, so recording costs no extra device sync.
Memory is bounded: at most ``max_steps`` columns (logged steps) are kept. When the
history is full, every other column is dropped and from then on only every second record
becomes a column, so the columns stay evenly spread over the whole run however long it
is. Two things survive the thinning: a NaN/Inf cell is copied into the column that
replaces it (a non-finite gradient never disappears from the heatmap), and exact
per-layer aggregates (min, max, zero / no-gradient / non-finite counts, last values)
are updated on every record.

A history can also be rebuilt from TensorBoard event files with
:meth:`GradientHistory.from_event_files`, which is what ``grad-guard report LOGDIR``
does.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grad_guard._validation import check_int
from grad_guard.loggers import GRAD_NORM, PARAM_NORM, SUMMARY, UPDATE_RATIO

QUANTITIES: tuple[str, ...] = ("grad_norm", "param_norm", "update_ratio")
"""Per-layer quantities a history holds, one matrix each."""

COUNTER_NAMES: tuple[str, ...] = (
    "nonfinite",
    "exploding",
    "vanishing",
    "amp_overflow",
    "skipped_steps",
)
"""Counters the report totals (the names detection uses in its ``counts``)."""

# Norms and ratios are >= 0, so a negative number can mark "not recorded" inside a
# float array without a second mask array per column.
_MISSING = -1.0


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


class GradientHistory:
    """Per-layer gradient norms (and parameter norms, update ratios) per logged step.

    Args:
        max_steps: most columns (logged steps) kept; older ones are thinned evenly
            (>= 2).
        max_events: most events kept (the oldest are dropped; ``events_total`` keeps
            counting).

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
            self._aggregate(name, value)
        if param_norms is not None:
            for name, value in zip(layer_names, param_norms, strict=True):
                if value is not None:
                    self.aggregates[name].last_param_norm = float(value)
        self.records += 1

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

    def _aggregate(self, name: str, value: float | None) -> None:
        self._layer_index(name)
        agg = self.aggregates[name]
        agg.records += 1
        agg.last_grad_norm = value
        if value is None:
            agg.no_grad += 1
            agg.dead_streak += 1
        elif not math.isfinite(value):
            agg.nonfinite += 1
            agg.dead_streak = 0
        else:
            agg.min = min(agg.min, value)
            agg.max = max(agg.max, value)
            if value == 0.0:
                agg.zero += 1
                agg.dead_streak += 1
            else:
                agg.dead_streak = 0

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
        self._stride = int(state.get("stride", 1))

    @classmethod
    def from_event_files(cls, logdir: str, max_steps: int = 512) -> GradientHistory:
        """Rebuild a history from the TensorBoard event files of one run.

        Reads the tags grad_guard writes (``grad_norm/<layer>``, ``param_norm/<layer>``,
        ``update_ratio/<layer>``, ``grad_guard/total_grad_norm`` and the
        ``grad_guard/<counter>`` totals) with TensorBoard's own ``EventAccumulator``.
        Works on a finished or a running run; nothing is trained.

        Args:
            logdir: a folder holding ``events.out.tfevents.*`` files directly, or a
                parent of run folders (then the run with the newest event file is read).
            max_steps: as in the constructor.

        Raises:
            FileNotFoundError: if ``logdir`` holds no event files.
        """
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        run_dir = find_run_dir(logdir)
        accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        accumulator.Reload()
        history = cls(max_steps=max_steps)
        history.meta["run_dir"] = run_dir

        per_quantity: dict[str, dict[str, dict[int, float]]] = {q: {} for q in QUANTITIES}
        prefixes = {GRAD_NORM: "grad_norm", PARAM_NORM: "param_norm", UPDATE_RATIO: "update_ratio"}
        totals: dict[int, float] = {}
        # Tags come back in the order they were first written: forward order for layers.
        for tag in accumulator.Tags().get("scalars", []):
            prefix, _, rest = tag.partition("/")
            if not rest:
                continue
            events = accumulator.Scalars(tag)
            if prefix in prefixes:
                per_quantity[prefixes[prefix]][rest] = {e.step: e.value for e in events}
            elif prefix == SUMMARY:
                _read_summary(history, rest, events, totals)

        grads = per_quantity["grad_norm"]
        if not grads:
            return history
        layers = list(grads)
        steps = sorted({step for values in grads.values() for step in values})
        for step in steps:
            present = [step in grads[name] for name in layers]
            params = per_quantity["param_norm"]
            param_norms = [params.get(name, {}).get(step) for name in layers] if params else None
            history.record(
                step,
                layers,
                [grads[name].get(step, 0.0) for name in layers],
                total_norm=totals.get(step),
                param_norms=param_norms,
                has_grad=present,
            )
            ratios = per_quantity["update_ratio"]
            names = [name for name in layers if step in ratios.get(name, {})]
            if names:
                history.record_update_ratios(step, names, [ratios[n][step] for n in names])
        return history


_COUNTER_ALIASES: dict[str, str] = {
    "nonfinite": "nonfinite",
    "non_finite": "nonfinite",
    "nonfinite_count": "nonfinite",
    "exploding": "exploding",
    "exploding_count": "exploding",
    "vanishing": "vanishing",
    "vanishing_count": "vanishing",
    "amp_overflow": "amp_overflow",
    "amp_overflows": "amp_overflow",
    "skipped": "skipped_steps",
    "skipped_steps": "skipped_steps",
}


def _read_summary(
    history: GradientHistory, name: str, events: Sequence[Any], totals: dict[int, float]
) -> None:
    base = name.rsplit("/", 1)[-1]  # drop an optimizer label
    if base == "total_grad_norm":
        totals.update({e.step: e.value for e in events})
    elif base in ("clipped_fraction", "clip_fraction") and events:
        # logged per interval (fraction of the steps since the previous log): weight each
        # value by the steps it covers
        covered = clipped = 0.0
        previous = -1
        for event in sorted(events, key=lambda e: e.step):
            steps = max(event.step - previous, 1)
            covered += steps
            clipped += event.value * steps
            previous = event.step
        fraction = clipped / covered
        current = history.clipped_fraction
        history.clipped_fraction = fraction if current is None else max(current, fraction)
    elif base in _COUNTER_ALIASES and events:
        key = _COUNTER_ALIASES[base]
        # counters are logged cumulatively: the last value is the total
        history.counts[key] = max(history.counts.get(key, 0), int(events[-1].value))


def event_files(logdir: str) -> list[str]:
    """Every ``events.out.tfevents.*`` file under ``logdir`` (recursively)."""
    pattern = os.path.join(glob.escape(logdir), "**", "events.out.tfevents.*")
    return sorted(glob.glob(pattern, recursive=True))


def find_run_dir(logdir: str) -> str:
    """The run folder to read in ``logdir``: the one with the newest event file.

    Raises:
        FileNotFoundError: if there is no event file under ``logdir``.
    """
    files = event_files(logdir)
    if not files:
        raise FileNotFoundError(
            f"no TensorBoard event files (events.out.tfevents.*) under {logdir!r}"
        )
    newest = max(files, key=lambda f: (os.path.getmtime(f), f))
    return os.path.dirname(newest)


def event_to_dict(event: Any) -> dict[str, Any]:
    """An anomaly event (dataclass or mapping) as plain, JSON-friendly Python data.

    Example:
        >>> event_to_dict({"step": 3, "kind": "nonfinite", "layers": ("fc1",)})
        {'step': 3, 'kind': 'nonfinite', 'layers': ['fc1']}
    """
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return _plain(dataclasses.asdict(event))
    return _plain(dict(event))


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


def _plain(value: Any) -> Any:
    """Make ``value`` JSON-friendly (tensors and numpy scalars become floats/lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
