"""Build a :class:`~grad_guard.report.health_report.Report` from a history or a run folder."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from grad_guard.history import COUNTER_NAMES, GradientHistory, event_to_dict
from grad_guard.report.findings import LayerRow
from grad_guard.report.health_report import Report
from grad_guard.report.model_info import inspect_model
from grad_guard.report.rules import Evidence, Thresholds, run_rules
from grad_guard.report.run_config import RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from grad_guard.report.run_reader import RunData


def build_report(
    history: GradientHistory,
    model: Any = None,
    precision: str | None = None,
    counts: Mapping[str, int] | None = None,
    clipped_fraction: float | None = None,
    events: Sequence[Any] | None = None,
    thresholds: Thresholds | None = None,
    config: RunConfig | Mapping[str, Any] | None = None,
    activations: Any = None,
) -> Report:
    """Build the :class:`Report` of a run from its history.

    Args:
        history: per-layer norms of the logged steps.
        model: the ``nn.Module`` (or LightningModule), to make the advice specific;
            ``None`` when only event files are at hand.
        precision: the Trainer's precision (``"16-mixed"``, ``"bf16-mixed"``, ``"32"``...);
            default: the config's.
        counts: anomaly counters (``nonfinite``, ``exploding``, ``vanishing``,
            ``amp_overflow``, ``skipped_steps``); default: the history's.
        clipped_fraction: fraction of steps a clipper clipped; default: the history's.
        events: anomaly events (dataclasses or mappings); default: the history's.
        thresholds: where the rules draw their lines.
        config: the run's grad_guard settings (a :class:`RunConfig` or the
            ``grad_guard/config`` JSON object), so that the advice does not recommend
            what the run already uses.
        activations: per-layer activation statistics (an ``ActivationHistory`` or a
            mapping layer -> ``LayerActivations``), for the activation rules.

    Raises:
        ValueError: if ``config`` is a mapping of the wrong shape.

    Example:
        >>> history = GradientHistory()
        >>> for step in range(20):
        ...     history.record(step, [f"fc{i}" for i in range(10)], [10.0 ** (i - 9) for i in range(10)])
        >>> report = build_report(history)
        >>> report.rules()
        ['vanishing_activation', 'vanishing_depth']
        >>> report.findings[0].evidence[0]
        'gradients at the input end are 7.0 orders of magnitude smaller than at the output end (median of the first vs last third of the layers; fc0: 1e-09, fc9: 1)'
    """
    if config is not None and not isinstance(config, RunConfig):
        config = RunConfig.from_mapping(config)
    limits = thresholds or Thresholds()
    totals: dict[str, Any] = {name: int(history.counts.get(name, 0)) for name in COUNTER_NAMES}
    if counts:
        totals.update({k: int(v) for k, v in counts.items()})
    fraction = clipped_fraction if clipped_fraction is not None else history.clipped_fraction
    totals["clipped_fraction"] = None if fraction is None else float(fraction)
    event_list = [event_to_dict(e) for e in events] if events is not None else list(history.events)
    info = inspect_model(model) if model is not None else None
    precision = precision or (config.precision if config is not None else None)

    rows = layer_rows(history, event_list, limits)
    evidence = Evidence(history, rows, info, limits, totals, precision, config, activations)
    findings = run_rules(evidence)
    steps = (
        (history.first_step, history.last_step)
        if history.first_step is not None and history.last_step is not None
        else None
    )
    return Report(
        layers=rows,
        totals=totals,
        findings=findings,
        model=info,
        precision=precision,
        steps=steps,
        logged_steps=history.records,
        events=event_list,
        config=config,
    )


def report_from_event_files(
    run_dir: str,
    precision: str | None = None,
    thresholds: Thresholds | None = None,
    max_steps: int = 512,
) -> Report:
    """The report of ONE run folder, from its TensorBoard event files alone.

    Reads the grad_guard scalars, the run's configuration (``grad_guard/config``) and
    its anomaly events (``grad_guard/anomaly_events``) with
    :func:`~grad_guard.report.run_reader.read_run`. A damaged event file is read up to
    the damage and said so in :attr:`Report.notices`; :attr:`Report.source` tells how
    much of each file was read. ``report.to_dict()`` is JSON-safe.

    Args:
        run_dir: a folder holding ``events.out.tfevents.*`` files itself.
        precision: overrides the logged precision.
        thresholds: where the rules draw their lines.
        max_steps: columns of the history kept.

    Raises:
        FileNotFoundError: if ``run_dir`` holds no event file.
    """
    from grad_guard.report.run_reader import read_run

    return report_from_run(read_run(run_dir, max_steps=max_steps), precision, thresholds)


def report_from_run(
    run: RunData, precision: str | None = None, thresholds: Thresholds | None = None
) -> Report:
    """The report of a run already read with :func:`~grad_guard.report.run_reader.read_run`."""
    report = build_report(
        run.history,
        precision=precision,
        events=run.events,
        thresholds=thresholds,
        config=run.config,
    )
    report.source = run.source()
    report.notices = run.notices()
    if not run.usable:
        report.notices.append(
            "no grad_guard gradient norms (tags grad_norm/<layer>) in this run: was "
            "GradientNormMonitor or GradGuard on the Trainer's callbacks?"
        )
    return report


def layer_rows(
    history: GradientHistory, events: list[dict[str, Any]], limits: Thresholds
) -> list[LayerRow]:
    """The report's table: one row per layer of ``history``, forward order."""
    grads = history.matrix("grad_norm").filled(np.nan)
    ratios = history.matrix("update_ratio").filled(np.nan)
    per_layer: dict[str, Counter[str]] = {}
    for event in events:
        for name in event.get("layers", []) or []:
            per_layer.setdefault(str(name), Counter())[str(event.get("kind", "event"))] += 1
    rows = []
    for i, name in enumerate(history.layers):
        agg = history.aggregates[name]
        finite = grads[i][np.isfinite(grads[i])]
        ratio = ratios[i][np.isfinite(ratios[i])] if ratios.size else np.array([])
        flags = []
        if agg.nonfinite:
            flags.append(f"NaN/Inf x{agg.nonfinite}")
        if agg.records >= 2 and agg.dead_streak >= min(limits.dead_steps, agg.records):
            flags.append("dead")
        rows.append(
            LayerRow(
                name=name,
                records=agg.records,
                min=agg.min if math.isfinite(agg.min) else None,
                median=float(np.median(finite)) if finite.size else None,
                max=agg.max if math.isfinite(agg.max) else None,
                last_param_norm=agg.last_param_norm,
                update_ratio=float(np.median(ratio)) if ratio.size else None,
                zero=agg.zero,
                no_grad=agg.no_grad,
                nonfinite=agg.nonfinite,
                events=dict(per_layer.get(name, {})),
                flags=flags,
            )
        )
    return rows
