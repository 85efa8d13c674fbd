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

Modules: :mod:`~grad_guard.history.gradient_history` (the class),
:mod:`~grad_guard.history.aggregate` (the exact per-layer facts),
:mod:`~grad_guard.history.events` (events as plain data). A history is rebuilt
from TensorBoard event files by :func:`grad_guard.report.run_reader.read_run` (or the
shortcut :meth:`GradientHistory.from_event_files`).
"""

from grad_guard.history.aggregate import LayerAggregate
from grad_guard.history.events import event_to_dict
from grad_guard.history.gradient_history import COUNTER_NAMES, QUANTITIES, GradientHistory

__all__ = ["COUNTER_NAMES", "QUANTITIES", "GradientHistory", "LayerAggregate", "event_to_dict"]
