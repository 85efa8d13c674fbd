"""One run's TensorBoard event files -> its history, configuration, events and read status.

A *run* is a folder that holds ``events.out.tfevents.*`` files itself (Lightning's
``lightning_logs/version_3``); :func:`find_runs` lists every run under a log directory.
:func:`read_run` reads all event files of one run (a resumed run has several; a step
written twice keeps its last value) with :mod:`grad_guard.report.eventfile`, so a file
damaged half-way is reported (:attr:`RunData.notices`) instead of silently giving a
shorter run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grad_guard.history import GradientHistory
from grad_guard.report.eventfile import FileRead, read_event_file
from grad_guard.report.logged_events import EVENTS_TAG, parse_events_markdown
from grad_guard.report.run_config import CONFIG_TAG, RunConfig

EVENT_FILE_PATTERN = "events.out.tfevents.*"

# The tag prefixes of grad_guard.loggers, repeated so that reading event files (the
# CLI, the TensorBoard plugin) does not import torch; tests/test_history.py checks that
# they are equal.
GRAD_NORM, PARAM_NORM, UPDATE_RATIO, SUMMARY = (
    "grad_norm",
    "param_norm",
    "update_ratio",
    "grad_guard",
)

_QUANTITIES = {GRAD_NORM: "grad_norm", PARAM_NORM: "param_norm", UPDATE_RATIO: "update_ratio"}
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
    "loss_spike": "loss_spike",
    "skipped": "skipped_steps",
    "skipped_steps": "skipped_steps",
    "rollbacks": "rollbacks",
}


@dataclass
class RunData:
    """What the event files of one run hold.

    Attributes:
        run_dir: the run folder.
        history: the per-layer norms, counters and clipped fraction.
        config: the run's grad_guard settings (``grad_guard/config``), if logged.
        events: anomaly events parsed from ``grad_guard/anomaly_events``, step order.
        files: how much of each event file was read.
        config_error: why a logged config could not be read, if it could not.
    """

    run_dir: str
    history: GradientHistory
    config: RunConfig | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    files: list[FileRead] = field(default_factory=list)
    config_error: str | None = None

    @property
    def complete(self) -> bool:
        """Whether every event file was read to its end."""
        return all(f.complete for f in self.files)

    @property
    def usable(self) -> bool:
        """Whether any gradient norm (``grad_norm/<layer>``) was read."""
        return bool(self.history.layers)

    def notices(self) -> list[str]:
        """Sentences about what could not be read (empty when everything was)."""
        notes = [f.describe() for f in self.files if not f.complete]
        if self.config_error:
            notes.append(f"{CONFIG_TAG} could not be read ({self.config_error}): advice ignores it")
        return notes

    def source(self) -> dict[str, Any]:
        """Where the data came from, for the report's JSON."""
        return {
            "run_dir": self.run_dir,
            "complete": self.complete,
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "bytes_read": f.bytes_read,
                    "records": f.records,
                    "first_step": f.first_step,
                    "last_step": f.last_step,
                    "error": f.error,
                }
                for f in self.files
            ],
        }


def event_files(logdir: str) -> list[str]:
    """Every ``events.out.tfevents.*`` file under ``logdir`` (recursively), sorted."""
    pattern = os.path.join(glob.escape(logdir), "**", EVENT_FILE_PATTERN)
    return sorted(glob.glob(pattern, recursive=True))


def find_runs(logdir: str) -> list[str]:
    """Run folders under ``logdir`` (``logdir`` itself included): those holding event files.

    Raises:
        FileNotFoundError: if there is no event file under ``logdir``.
    """
    runs = sorted({os.path.dirname(path) for path in event_files(logdir)})
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard event files ({EVENT_FILE_PATTERN}) under {logdir!r}"
        )
    return runs


def newest_run(logdir: str) -> str:
    """The run under ``logdir`` with the most recently modified event file.

    Raises:
        FileNotFoundError: if there is no event file under ``logdir``.
    """
    find_runs(logdir)
    newest = max(event_files(logdir), key=lambda f: (os.path.getmtime(f), f))
    return os.path.dirname(newest)


def read_run(run_dir: str, max_steps: int = 512) -> RunData:
    """Read every event file directly in ``run_dir`` (oldest first).

    Args:
        run_dir: a run folder (see :func:`find_runs`).
        max_steps: columns the history keeps (as in :class:`GradientHistory`).

    Raises:
        FileNotFoundError: if ``run_dir`` holds no event file.
    """
    paths = sorted(glob.glob(os.path.join(glob.escape(run_dir), EVENT_FILE_PATTERN)))
    if not paths:
        raise FileNotFoundError(f"no TensorBoard event files ({EVENT_FILE_PATTERN}) in {run_dir!r}")
    scalars: dict[str, dict[int, float]] = {}  # insertion order: first written first
    texts: list[tuple[int, str, str]] = []
    files = []
    for path in paths:
        data = read_event_file(path)
        files.append(data.read)
        for step, tag, value in data.scalars:
            scalars.setdefault(tag, {})[step] = value
        texts += data.texts
    run = RunData(run_dir, GradientHistory(max_steps=max_steps), files=files)
    run.history.meta["run_dir"] = run_dir
    _fill_history(run.history, scalars)
    _read_texts(run, texts)
    return run


def _read_texts(run: RunData, texts: Sequence[tuple[int, str, str]]) -> None:
    events: dict[tuple[int, str, int], dict[str, Any]] = {}
    for step, tag, text in texts:
        if tag == CONFIG_TAG:
            try:
                run.config, run.config_error = RunConfig.from_json(text), None
            except ValueError as err:
                run.config_error = str(err)
        elif tag == EVENTS_TAG:
            for i, event in enumerate(parse_events_markdown(text)):
                events[(step, text, i)] = event  # an entry written twice (resume) counts once
    run.events = sorted(events.values(), key=lambda e: e["step"])


def _fill_history(history: GradientHistory, scalars: dict[str, dict[int, float]]) -> None:
    per_quantity: dict[str, dict[str, dict[int, float]]] = {q: {} for q in _QUANTITIES.values()}
    totals: dict[int, float] = {}
    for tag, values in scalars.items():
        prefix, _, rest = tag.partition("/")
        if not rest:
            continue
        if prefix in _QUANTITIES:
            per_quantity[_QUANTITIES[prefix]][rest] = values
        elif prefix == SUMMARY:
            _read_summary(history, rest, values, totals)
    grads = per_quantity["grad_norm"]
    params, ratios = per_quantity["param_norm"], per_quantity["update_ratio"]
    layers = list(grads)
    for step in sorted({step for values in grads.values() for step in values}):
        history.record(
            step,
            layers,
            [grads[name].get(step, 0.0) for name in layers],
            total_norm=totals.get(step),
            param_norms=[params.get(name, {}).get(step) for name in layers] if params else None,
            has_grad=[step in grads[name] for name in layers],
        )
        names = [name for name in layers if step in ratios.get(name, {})]
        if names:
            history.record_update_ratios(step, names, [ratios[n][step] for n in names])


def _read_summary(
    history: GradientHistory, name: str, values: dict[int, float], totals: dict[int, float]
) -> None:
    base = name.rsplit("/", 1)[-1]  # drop an optimizer label or the "anomalies/" level
    if not values:
        return
    if base == "total_grad_norm":
        totals.update(values)
    elif base in ("clipped_fraction", "clip_fraction"):
        # logged per interval (the fraction of the steps since the previous log):
        # weight each value by the steps it covers
        covered = clipped = 0.0
        previous = -1
        for step in sorted(values):
            steps = max(step - previous, 1)
            covered += steps
            clipped += values[step] * steps
            previous = step
        fraction = clipped / covered
        current = history.clipped_fraction
        history.clipped_fraction = fraction if current is None else max(current, fraction)
    elif base in _COUNTER_ALIASES:
        key = _COUNTER_ALIASES[base]
        # counters are logged cumulatively: the value at the last step is the total
        last = values[max(values)]
        history.counts[key] = max(history.counts.get(key, 0), int(last))
