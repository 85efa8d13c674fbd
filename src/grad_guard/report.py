"""End-of-fit gradient health report: a per-layer table and a diagnosis with advice.

:func:`build_report` turns a :class:`~grad_guard.history.GradientHistory` (plus,
optionally, the model and the Trainer's precision) into a :class:`Report`:

* a table with, per layer, min / median / max gradient norm, the last parameter norm,
  the median update ratio and the events that named the layer;
* totals: skipped steps, clipped fraction, AMP overflows, anomaly counts;
* :class:`Finding` objects: rules that turn the evidence into advice, each citing the
  numbers it rests on. With the model at hand (activation modules, normalization
  layers, depth, shortcuts, init) the advice names the change to make; without it
  (``grad-guard report LOGDIR``) the advice says what to check.

The report prints with rich when it is installed (plain text otherwise) and is written
as ``grad_guard_report.json`` (machine-readable) and ``grad_guard_report.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

import numpy as np

from grad_guard.history import COUNTER_NAMES, GradientHistory, event_to_dict

JSON_NAME = "grad_guard_report.json"
MARKDOWN_NAME = "grad_guard_report.md"
HEALTHY_UPDATE_RATIO = 1e-3

Severity = Literal["critical", "warning", "info"]

_SATURATING = ("Sigmoid", "Tanh", "Softsign", "Hardtanh", "Hardsigmoid", "LogSigmoid", "Tanhshrink")
_RELU_FAMILY = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "PReLU",
    "RReLU",
    "ELU",
    "SELU",
    "CELU",
    "GELU",
    "SiLU",
    "Mish",
    "Hardswish",
)
_NORM_PATTERN = re.compile(
    r"(BatchNorm|LayerNorm|GroupNorm|InstanceNorm|RMSNorm|LocalResponseNorm)"
)
_RESIDUAL_PATTERN = re.compile(
    r"(Residual|ResNet|ResBlock|PreAct|Bottleneck|TransformerEncoderLayer|TransformerDecoderLayer)"
)
# layer names that are normalization layers, for reports without a model
_NORM_NAME = re.compile(
    r"(^|[._/])(bn|norm|ln|gn|layernorm|batchnorm|groupnorm)\w*$", re.IGNORECASE
)
# std(w) * sqrt(fan_in) right after each init scheme (square layers, ReLU gain for He)
_INIT_SCALES = {"default": 1 / math.sqrt(3), "xavier": 1.0, "he": math.sqrt(2)}
_MAX_SLOPE = {"Sigmoid": "0.25", "Hardsigmoid": "1/6", "LogSigmoid": "1"}
_FP16 = {"16", "16-mixed", "16-true", "fp16", "half", "float16"}
_BF16 = {"bf16", "bf16-mixed", "bf16-true", "bfloat16"}


@dataclass
class ModelInfo:
    """What :func:`inspect_model` found in a model.

    Attributes:
        name: class name of the model.
        depth: number of weight layers (``Linear`` / ``Conv``).
        activations: activation module class name -> count.
        norm_layers: normalization module class name -> count.
        residual: whether shortcuts were found (a ``residual`` attribute, or block class
            names such as ``ResidualMLP``/``PreActBlock``/``Bottleneck``).
        convolutional: whether the model has convolutions.
        init: initialisation scheme named by the model (an ``init`` attribute), if any.
        weight_scale: median of ``std(W) * sqrt(fan_in)`` over weight layers (PyTorch's
            default init gives about 0.58, Xavier 1.0, He 1.41).
        weight_layers: module paths of the weight layers, forward order.
    """

    name: str
    depth: int
    activations: dict[str, int]
    norm_layers: dict[str, int]
    residual: bool
    convolutional: bool
    init: str | None
    weight_scale: float | None
    weight_layers: list[str] = field(default_factory=list)

    @property
    def saturating(self) -> list[str]:
        """Saturating activations present (sigmoid / tanh family)."""
        return [name for name in self.activations if name in _SATURATING]

    @property
    def relu_family(self) -> list[str]:
        return [name for name in self.activations if name in _RELU_FAMILY]

    def init_guess(self) -> str | None:
        """The init the weights look like (``init`` attribute first, then the scale)."""
        if self.init:
            return self.init
        if self.weight_scale is None:
            return None
        name, scale = min(
            _INIT_SCALES.items(), key=lambda kv: abs(math.log(self.weight_scale / kv[1]))
        )
        return name if abs(math.log(self.weight_scale / scale)) < math.log(1.2) else None

    def describe(self) -> str:
        parts = [f"{self.name}: {self.depth} weight layers"]
        acts = ", ".join(f"{n} x{c}" for n, c in self.activations.items()) or "none as modules"
        parts.append(f"activations {acts}")
        norms = ", ".join(f"{n} x{c}" for n, c in self.norm_layers.items()) or "none"
        parts.append(f"normalization {norms}")
        parts.append("residual shortcuts" if self.residual else "no residual shortcuts")
        if self.init_guess():
            parts.append(f"init {self.init_guess()}")
        return "; ".join(parts)


def inspect_model(model: Any) -> ModelInfo:
    """Look at a ``torch.nn.Module``'s structure: activations, norms, depth, shortcuts.

    Example:
        >>> from torch import nn
        >>> info = inspect_model(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)))
        >>> info.depth, info.saturating, info.residual
        (2, ['Sigmoid'], False)
    """
    from torch import nn

    activations: Counter[str] = Counter()
    norms: Counter[str] = Counter()
    residual_flags: list[bool] = []
    residual_names = False
    convolutional = False
    init = None
    scales = []
    weight_layers = []
    for path, module in model.named_modules():
        kind = type(module).__name__
        if kind in _SATURATING or kind in _RELU_FAMILY:
            activations[kind] += 1
        if _NORM_PATTERN.search(kind):
            norms[kind] += 1
        if isinstance(getattr(module, "residual", None), bool):
            residual_flags.append(module.residual)
        elif _RESIDUAL_PATTERN.search(kind):
            residual_names = True
        if init is None and isinstance(getattr(module, "init", None), str):
            init = module.init
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            convolutional |= isinstance(module, nn.modules.conv._ConvNd)
            weight_layers.append(path)
            weight = module.weight.detach()
            fan_in = weight[0].numel() if weight.dim() > 1 else 0
            if fan_in and weight.numel() > 1:
                scales.append(float(weight.float().std()) * math.sqrt(fan_in))
    residual = any(residual_flags) if residual_flags else residual_names
    return ModelInfo(
        name=type(model).__name__,
        depth=len(weight_layers),
        activations=dict(activations),
        norm_layers=dict(norms),
        residual=residual,
        convolutional=convolutional,
        init=init,
        weight_scale=float(np.median(scales)) if scales else None,
        weight_layers=weight_layers,
    )


@dataclass
class LayerRow:
    """One line of the report's table (norms over the kept, finite records)."""

    name: str
    records: int
    min: float | None
    median: float | None
    max: float | None
    last_param_norm: float | None
    update_ratio: float | None
    zero: int
    no_grad: int
    nonfinite: int
    events: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def events_text(self) -> str:
        parts = [f"{kind} x{count}" for kind, count in self.events.items()]
        parts += self.flags
        return ", ".join(parts) or "-"


@dataclass
class Finding:
    """One diagnosis: what was seen (evidence with numbers) and what to try (advice)."""

    rule: str
    severity: Severity
    title: str
    evidence: list[str]
    advice: list[str]
    layers: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The end-of-fit report. Build it with :func:`build_report`."""

    layers: list[LayerRow]
    totals: dict[str, Any]
    findings: list[Finding]
    model: ModelInfo | None
    precision: str | None
    steps: tuple[int, int] | None
    logged_steps: int
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No finding above ``"info"``."""
        return not any(f.severity != "info" for f in self.findings)

    def rules(self) -> list[str]:
        return [f.rule for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe data (NaN -> ``None``, Inf -> ``"inf"``)."""
        return _json_safe(
            {
                "format": "grad_guard_report/1",
                "healthy": self.healthy,
                "logged_steps": self.logged_steps,
                "step_range": list(self.steps) if self.steps else None,
                "precision": self.precision,
                "model": asdict(self.model) if self.model else None,
                "totals": self.totals,
                "findings": [asdict(f) for f in self.findings],
                "layers": [asdict(r) for r in self.layers],
                "events": self.events,
            }
        )

    # ------------------------------------------------------------------ text
    def _headline(self) -> str:
        span = f"steps {self.steps[0]}-{self.steps[1]}" if self.steps else "no steps"
        verdict = (
            "no gradient problems found"
            if self.healthy
            else (f"{sum(f.severity != 'info' for f in self.findings)} problem(s) found")
        )
        return f"grad_guard report: {len(self.layers)} layers, {self.logged_steps} logged steps ({span}): {verdict}"

    def _totals_text(self) -> str:
        t = self.totals
        clipped = (
            "n/a" if t.get("clipped_fraction") is None else f"{100 * t['clipped_fraction']:.1f}%"
        )
        return (
            f"skipped steps {t.get('skipped_steps', 0)} | clipped {clipped} | "
            f"AMP overflows {t.get('amp_overflow', 0)} | non-finite {t.get('nonfinite', 0)} | "
            f"exploding {t.get('exploding', 0)} | vanishing {t.get('vanishing', 0)}"
        )

    def _table_rows(self, max_rows: int | None) -> tuple[list[LayerRow], int]:
        rows = self.layers
        if max_rows is None or len(rows) <= max_rows:
            return rows, 0
        # rare troubles (NaN, dead, events) first, then layers spread evenly over the depth
        flagged = [i for i, r in enumerate(rows) if r.events or set(r.flags) - {"vanishing"}]
        keep = set(flagged[: max_rows // 2])
        spread = max_rows - len(keep)
        keep |= {round(k * (len(rows) - 1) / max(spread - 1, 1)) for k in range(spread)}
        chosen = [rows[i] for i in sorted(keep)]
        return chosen, len(rows) - len(chosen)

    def render_text(self, max_rows: int | None = 40) -> str:
        """The report as plain text (what is printed without rich)."""
        lines = [self._headline(), ""]
        header = ("layer", "min", "median", "max", "param norm", "update ratio", "events")
        rows, hidden = self._table_rows(max_rows)
        cells = [header] + [_row_cells(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        for cell in cells:
            lines.append(
                "  ".join(
                    c.ljust(w) if i in (0, 6) else c.rjust(w)
                    for i, (c, w) in enumerate(zip(cell, widths))
                ).rstrip()
            )
        if hidden:
            lines.append(f"... {hidden} more layers in {JSON_NAME}")
        lines += ["", self._totals_text()]
        if self.model:
            lines.append(f"model: {self.model.describe()}")
        lines.append("")
        lines += self._findings_text()
        return "\n".join(lines)

    def _findings_text(self) -> list[str]:
        if not self.findings:
            return ["Diagnosis: healthy, no rule fired."]
        lines = ["Diagnosis:"]
        for f in self.findings:
            lines.append(f"[{f.severity.upper()}] {f.title}")
            lines += [f"    evidence: {e}" for e in f.evidence]
            lines += [f"    try: {a}" for a in f.advice]
        return lines

    def to_markdown(self, max_rows: int | None = 200) -> str:
        """The report as Markdown (``grad_guard_report.md``)."""
        out = [f"# {self._headline()}", ""]
        if self.model:
            out += [f"Model: {self.model.describe()}", ""]
        if self.precision:
            out += [f"Precision: `{self.precision}`", ""]
        out += ["## Diagnosis", ""]
        if not self.findings:
            out += ["Healthy: no rule fired.", ""]
        for f in self.findings:
            out += [f"### {f.severity}: {f.title}", "", "Evidence:", ""]
            out += [f"- {e}" for e in f.evidence]
            out += ["", "Try:", ""]
            out += [f"- {a}" for a in f.advice]
            out.append("")
        out += ["## Totals", "", self._totals_text(), "", "## Layers", ""]
        out += [
            "| layer | min | median | max | param norm | update ratio | events |",
            "|---|---|---|---|---|---|---|",
        ]
        rows, hidden = self._table_rows(max_rows)
        out += ["| " + " | ".join(_row_cells(r)).replace("`", "") + " |" for r in rows]
        if hidden:
            out += ["", f"{hidden} more layers in `{JSON_NAME}`."]
        return "\n".join(out) + "\n"

    def print(
        self, file: TextIO | None = None, use_rich: bool | None = None, max_rows: int | None = 40
    ) -> None:
        """Print the report, as a rich table when rich is installed (or ``use_rich``)."""
        file = file or sys.stdout
        if use_rich is not False:
            try:
                self._print_rich(file, max_rows)
                return
            except ImportError:
                if use_rich:
                    raise
        print(self.render_text(max_rows), file=file)

    def _print_rich(self, file: TextIO, max_rows: int | None) -> None:
        from rich.console import Console
        from rich.table import Table

        # rich would wrap the table at 80 columns when writing to a pipe or a file
        console = Console(file=file, width=None if _isatty(file) else 140)
        console.print(self._headline(), style="bold", markup=False, highlight=False)
        table = Table()
        for name in ("layer", "min", "median", "max", "param norm", "update ratio", "events"):
            table.add_column(name, justify="left" if name in ("layer", "events") else "right")
        rows, hidden = self._table_rows(max_rows)
        for row in rows:
            style = "red" if row.nonfinite or "dead" in row.flags else None
            table.add_row(*_row_cells(row), style=style)
        console.print(table, markup=False)
        if hidden:
            console.print(f"... {hidden} more layers in {JSON_NAME}", markup=False)
        console.print(self._totals_text(), markup=False)
        if self.model:
            console.print(f"model: {self.model.describe()}", markup=False)
        colors = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
        if not self.findings:
            console.print("Diagnosis: healthy, no rule fired.", style="green", markup=False)
        for f in self.findings:
            console.print(
                f"[{f.severity.upper()}] {f.title}", style=colors[f.severity], markup=False
            )
            for e in f.evidence:
                console.print(f"    evidence: {e}", markup=False, highlight=False)
            for a in f.advice:
                console.print(f"    try: {a}", markup=False, highlight=False)

    def write(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """Write ``grad_guard_report.json`` and ``grad_guard_report.md`` into ``directory``."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        paths = {
            "json": os.path.join(directory, JSON_NAME),
            "markdown": os.path.join(directory, MARKDOWN_NAME),
        }
        with open(paths["json"], "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, allow_nan=False)
        with open(paths["markdown"], "w", encoding="utf-8") as handle:
            handle.write(self.to_markdown())
        return paths


# ---------------------------------------------------------------------- building


@dataclass
class Thresholds:
    """Where the rules draw their lines (defaults suit most runs).

    Attributes:
        vanishing_orders: input-end layers this many orders of magnitude below the
            output end count as vanishing.
        spike_factor: a total norm this many times the median of the previous steps is
            a spike.
        drift_factor: the median total norm of the last quarter vs the first quarter
            changing by this factor is a drift in scale.
        frequent_clipping: clipped fraction above which clipping is "frequent".
        dead_steps: consecutive logged steps with a zero/no gradient that make a layer
            dead.
        update_ratio_factor: median update ratio this many times above or below 1e-3 is
            "far" from healthy.
    """

    vanishing_orders: float = 3.0
    spike_factor: float = 5.0
    drift_factor: float = 10.0
    frequent_clipping: float = 0.5
    dead_steps: int = 5
    update_ratio_factor: float = 30.0


def build_report(
    history: GradientHistory,
    model: Any = None,
    precision: str | None = None,
    counts: Mapping[str, int] | None = None,
    clipped_fraction: float | None = None,
    events: Sequence[Any] | None = None,
    thresholds: Thresholds | None = None,
) -> Report:
    """Build the :class:`Report` of a run from its history.

    Args:
        history: per-layer norms of the logged steps.
        model: the ``nn.Module`` (or LightningModule), to make the advice specific;
            ``None`` when only event files are at hand.
        precision: the Trainer's precision (``"16-mixed"``, ``"bf16-mixed"``, ``"32"``...).
        counts: anomaly counters (``nonfinite``, ``exploding``, ``vanishing``,
            ``amp_overflow``, ``skipped_steps``); default: the history's.
        clipped_fraction: fraction of steps a clipper clipped; default: the history's.
        events: anomaly events (dataclasses or mappings); default: the history's.
        thresholds: where the rules draw their lines.

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
    limits = thresholds or Thresholds()
    totals: dict[str, Any] = {name: int(history.counts.get(name, 0)) for name in COUNTER_NAMES}
    if counts:
        totals.update({k: int(v) for k, v in counts.items()})
    fraction = clipped_fraction if clipped_fraction is not None else history.clipped_fraction
    totals["clipped_fraction"] = None if fraction is None else float(fraction)
    event_list = [event_to_dict(e) for e in events] if events is not None else list(history.events)
    info = inspect_model(model) if model is not None else None

    rows = _layer_rows(history, event_list, limits)
    evidence = _Evidence(history, rows, info, limits)
    findings: list[Finding] = []
    for rule in (_vanishing, _exploding, _nonfinite, _dead_layers, _update_ratio):
        new = rule(evidence, totals, info, precision)
        for finding in new:
            if finding.rule.startswith("vanishing"):
                for name in finding.layers:
                    row = evidence.row(name)
                    if row is not None and "vanishing" not in row.flags:
                        row.flags.append("vanishing")
        findings += new
    steps = (history.steps[0], history.steps[-1]) if history.steps else None
    return Report(
        layers=rows,
        totals=totals,
        findings=findings,
        model=info,
        precision=precision,
        steps=steps,
        logged_steps=history.records,
        events=event_list,
    )


def _finite_positive(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values) & (values > 0)]


def _layer_rows(
    history: GradientHistory, events: list[dict[str, Any]], limits: Thresholds
) -> list[LayerRow]:
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
        if (
            agg.records
            and agg.dead_streak >= min(limits.dead_steps, agg.records)
            and agg.records >= 2
        ):
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


class _Evidence:
    """Numbers the rules share, computed once."""

    def __init__(
        self,
        history: GradientHistory,
        rows: list[LayerRow],
        info: ModelInfo | None,
        limits: Thresholds,
    ) -> None:
        self.history = history
        self.rows = rows
        self.limits = limits
        self._by_name = {r.name: r for r in rows}
        grads = history.matrix("grad_norm").filled(np.nan)
        profile = []
        for i in range(len(history.layers)):
            values = _finite_positive(grads[i])
            profile.append(float(np.median(values)) if values.size else math.nan)
        self.profile = dict(zip(history.layers, profile))
        self.weight_layers = _weight_layers(history.layers, info)
        self.totals = history.total_norm_array()

    def row(self, name: str) -> LayerRow | None:
        return self._by_name.get(name)

    def depth_profile(self) -> list[tuple[str, float]]:
        """(layer, median norm) of weight layers with a usable median, forward order."""
        return [
            (n, self.profile[n])
            for n in self.weight_layers
            if math.isfinite(self.profile.get(n, math.nan))
        ]


def _weight_layers(layers: Sequence[str], info: ModelInfo | None) -> list[str]:
    """Layers holding Linear/Conv weights (normalization layers distort the depth trend)."""
    if info is not None and info.weight_layers:
        paths = set(info.weight_layers)
        chosen = [name for name in layers if _strip_label(name) in paths]
        if len(chosen) < 2:  # the model given is a wrapper's child, or wraps the monitored one
            chosen = [
                name
                for name in layers
                if any(
                    _strip_label(name).endswith("." + p) or p.endswith("." + _strip_label(name))
                    for p in paths
                )
            ]
        if len(chosen) >= 2:
            return chosen
    return [name for name in layers if not _NORM_NAME.search(_strip_label(name))]


def _strip_label(name: str) -> str:
    return name.split("/", 1)[1] if name.startswith("optimizer_") and "/" in name else name


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2g}" if value != 0 else "0"


def _row_cells(row: LayerRow) -> tuple[str, ...]:
    return (
        row.name,
        _fmt(row.min),
        _fmt(row.median),
        _fmt(row.max),
        _fmt(row.last_param_norm),
        _fmt(row.update_ratio),
        row.events_text(),
    )


def _names(names: Sequence[str], most: int = 4) -> str:
    if len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[: most - 1]) + f", ... ({len(names) - most + 1} more), {names[-1]}"


# ---------------------------------------------------------------------- rules


def _vanishing(
    ev: _Evidence, totals: dict[str, Any], info: ModelInfo | None, precision: str | None
) -> list[Finding]:
    profile = ev.depth_profile()
    findings: list[Finding] = []
    if len(profile) < 3:
        if totals.get("vanishing"):
            findings.append(
                Finding(
                    "vanishing_activation",
                    "warning",
                    "Vanishing gradients reported by detection",
                    [f"detection counted {totals['vanishing']} vanishing step(s)"],
                    [
                        "use ReLU-family activations with He init, BatchNorm/LayerNorm, or residual connections"
                    ],
                )
            )
        return findings
    names = [n for n, _ in profile]
    logs = np.log10([v for _, v in profile])
    third = max(1, len(profile) // 3)
    input_end, output_end = float(np.median(logs[:third])), float(np.median(logs[-third:]))
    orders = output_end - input_end
    first, last = profile[0], profile[-1]
    detected = int(totals.get("vanishing", 0))
    if orders < ev.limits.vanishing_orders and not (detected and orders > 1.0):
        return findings

    low = [
        n for n, v in profile if math.log10(v) < output_end - ev.limits.vanishing_orders
    ] or names[:third]
    steps = np.diff(logs)
    rising = float(np.mean(steps > 0)) if len(steps) else 0.0
    per_layer = 10 ** float(np.polyfit(np.arange(len(logs)), logs, 1)[0]) if len(logs) > 1 else 1.0
    evidence = [
        f"gradients at the input end are {orders:.1f} orders of magnitude smaller than at the "
        f"output end (median of the first vs last third of the layers; {first[0]}: "
        f"{_fmt(first[1])}, {last[0]}: {_fmt(last[1])})",
    ]
    if detected:
        evidence.append(f"detection counted {detected} vanishing step(s)")
    frozen = [
        r.name
        for r in ev.rows
        if r.name in low and r.update_ratio is not None and r.update_ratio < 1e-6
    ]
    if frozen:
        evidence.append(
            f"{len(frozen)} layer(s) barely move (update ratio < 1e-6): {_names(frozen)}"
        )

    # rule 1: saturating activations / init
    advice: list[str] = []
    if info is None:
        evidence.append("model not available: activation types unknown")
        advice.append(
            "if the model uses sigmoid or tanh: switch to ReLU-family activations "
            "(ReLU, LeakyReLU, GELU), whose derivative is 1 for active units instead of at "
            "most 0.25 (sigmoid), and initialise with He (Kaiming) init"
        )
    else:
        guess = info.init_guess()
        if info.saturating:
            count = sum(info.activations[a] for a in info.saturating)
            evidence.append(
                f"the model has {count} saturating activation module(s) ({', '.join(info.saturating)}): "
                "their derivative is at most "
                + " / ".join(f"{_MAX_SLOPE.get(a, '1')} ({a})" for a in info.saturating)
                + " and near 0 once they saturate, so each layer shrinks the backward signal"
            )
            advice.append(
                "replace " + "/".join(info.saturating) + " with a ReLU-family activation "
                "(nn.ReLU, nn.LeakyReLU, nn.GELU) and use He (Kaiming) init: "
                "grad_guard.models.init_weights(model, 'he', 'relu') or "
                "DeepMLP(..., activation='relu', init='he')"
            )
        if info.weight_scale is not None:
            evidence.append(
                f"weights have std*sqrt(fan_in) ~ {info.weight_scale:.2f}"
                + (
                    f" (looks like '{guess}' init; He gives 1.41, PyTorch's default 0.58)"
                    if guess
                    else " (He gives 1.41, PyTorch's default 0.58)"
                )
            )
        if not info.saturating and guess in ("default", "xavier"):
            advice.append(
                f"the weights look like '{guess}' init, too small for ReLU-family stacks: use He "
                "(Kaiming) init, e.g. grad_guard.models.init_weights(model, 'he', 'relu')"
            )
    if advice:
        findings.append(
            Finding(
                "vanishing_activation",
                "warning",
                "Vanishing gradients: the input-end layers get almost no gradient",
                evidence,
                advice,
                low,
            )
        )

    # rule 2: plain deep stack -> shortcuts / normalization
    growing = rising >= 0.7 and per_layer > 1.0
    plain = info is None or not info.residual
    if growing and plain:
        depth_ev = [
            f"the gradient shrinks by about {per_layer:.2g}x per layer going towards the input, "
            f"in {100 * rising:.0f}% of consecutive layer pairs over {len(profile)} layers"
        ]
        target = (
            "grad_guard.models.ResNet (CNN)"
            if info and info.convolutional
            else "grad_guard.models.ResidualMLP (MLP)"
            if info
            else "grad_guard.models.ResidualMLP (MLP) or grad_guard.models.ResNet (CNN)"
        )
        if info is not None:
            depth_ev.append(
                f"the model is a plain stack of {info.depth} weight layers without residual "
                "shortcuts" + (" and without normalization layers" if not info.norm_layers else "")
            )
        tip = [
            f"add residual connections (x + f(x)) so the gradient reaches early layers through the identity "
            f"path, as in {target}"
        ]
        if info is None or not info.norm_layers:
            tip.append(
                "add BatchNorm (or LayerNorm) inside each block to keep activations at unit scale"
            )
        findings.append(
            Finding(
                "vanishing_depth",
                "warning",
                "Vanishing grows with depth in a plain stack",
                depth_ev + evidence[:1],
                tip,
                low,
            )
        )
    elif growing and not advice:
        findings.append(
            Finding(
                "vanishing_depth",
                "warning",
                "Vanishing gradients in a residual model",
                evidence,
                [
                    "check that the residual branches end in a normalization or a small-init layer and "
                    "that the shortcuts are not gated by saturating activations"
                ],
                low,
            )
        )
    return findings


def _spikes(totals: np.ndarray, factor: float) -> list[int]:
    """Steps whose total norm is ``factor`` x above both the recent and the run's median.

    The run's median keeps a converged run, whose norms shrink, from calling an ordinary
    batch a spike.
    """
    finite = totals[np.isfinite(totals)]
    overall = float(np.median(finite)) if finite.size else math.inf
    spikes = []
    for j in range(4, len(totals)):
        previous = totals[max(0, j - 8) : j]
        previous = previous[np.isfinite(previous)]
        if (
            previous.size >= 4
            and np.isfinite(totals[j])
            and totals[j] > factor * max(float(np.median(previous)), overall)
        ):
            spikes.append(j)
    return spikes


def _exploding(
    ev: _Evidence, totals: dict[str, Any], info: ModelInfo | None, precision: str | None
) -> list[Finding]:
    values = ev.totals
    finite_idx = np.nonzero(np.isfinite(values) & (values > 0))[0]
    evidence: list[str] = []
    spikes = _spikes(values, ev.limits.spike_factor)
    drift = None
    if finite_idx.size >= 8:
        quarter = max(2, finite_idx.size // 4)
        early = float(np.median(values[finite_idx[:quarter]]))
        late = float(np.median(values[finite_idx[-quarter:]]))
        drift = late / early if early > 0 else None
    steps = ev.history.steps
    blew_up = False
    if finite_idx.size >= 2:
        first_value, peak = values[finite_idx[0]], float(np.max(values[finite_idx]))
        peak_idx = int(finite_idx[np.argmax(values[finite_idx])])
        later_nonfinite = np.nonzero(~np.isfinite(values[peak_idx:]))[0]
        if peak > 100 * first_value and (later_nonfinite.size or peak_idx >= finite_idx[-1] - 1):
            blew_up = True
            evidence.append(
                f"total gradient norm grew from {_fmt(first_value)} (step {steps[finite_idx[0]]}) "
                f"to {_fmt(peak)} (step {steps[peak_idx]})"
                + (
                    f" and became non-finite at step {steps[peak_idx + int(later_nonfinite[0])]}"
                    if later_nonfinite.size
                    else ""
                )
            )
    if spikes:
        worst = max(spikes, key=lambda j: values[j])
        evidence.append(
            f"{len(spikes)} spike(s) of the total norm above {ev.limits.spike_factor:g}x the median "
            f"of the previous logged steps and of the run (largest {_fmt(values[worst])} at step {steps[worst]})"
        )
    drifting = drift is not None and (drift >= ev.limits.drift_factor)
    if drifting:
        evidence.append(
            f"the typical total norm drifted {drift:.2g}x from the first to the last quarter of the run"
        )
    if totals.get("exploding"):
        evidence.append(f"detection counted {totals['exploding']} exploding step(s)")
    clipped = totals.get("clipped_fraction")
    frequent = clipped is not None and clipped >= ev.limits.frequent_clipping
    if frequent:
        evidence.append(
            f"clipping acted on {100 * clipped:.0f}% of the steps: the threshold is below the typical "
            "norm, so clipping has turned into a smaller learning rate"
        )
    if not evidence:
        return []

    advice = ["lower the learning rate (try 3-10x smaller)"]
    # where the trouble starts, in kept columns (evenly spread over the run)
    onset = spikes[0] if spikes else None
    if blew_up:
        rising = np.nonzero(values[finite_idx] > 10 * values[finite_idx[0]])[0]
        onset = int(finite_idx[rising[0]]) if rising.size else onset
    if onset is not None and onset < max(10, 0.1 * len(values)):
        advice.append(
            "add a learning-rate warm-up (e.g. linear over the first 5-10% of steps): the trouble "
            "starts early, when the weights are least adapted to a large learning rate"
        )
    if frequent:
        choice = (
            "AutoClip (AdaptiveGradientClipping('autoclip')): its threshold is a percentile of the "
            "norms seen so far, so it follows the scale instead of clipping almost every step"
        )
    elif drifting:
        choice = (
            "AutoClip (AdaptiveGradientClipping('autoclip')): the norm's scale drifts over the run, and a "
            "percentile of the history follows it where a fixed max_norm would be too tight or too loose"
        )
    elif spikes and not blew_up:
        choice = (
            "ZClip (AdaptiveGradientClipping('zscore')): the norm is stable apart from isolated spikes, "
            "which a z-score against its running mean/variance catches without touching normal steps"
        )
    elif info is not None and not info.norm_layers:
        choice = (
            "AGC (AdaptiveGradientClipping('agc')): the model has no normalization layers, and unit-wise "
            "clipping relative to each weight's norm is what keeps normalizer-free/large-batch nets stable"
        )
    else:
        choice = (
            "ZClip (AdaptiveGradientClipping('zscore')) to cut the blow-up at its first spike, or a fixed "
            "NormClip(max_norm) near the typical pre-explosion norm"
        )
    advice.append("clip adaptively with " + choice)
    if not any(c in choice for c in ("AGC",)):
        advice.append(
            "for large-batch or normalizer-free models prefer AGC (unit-wise, relative to weight norms)"
        )
    severity: Severity = "critical" if blew_up else "warning"
    if blew_up:
        title = "Exploding gradients: the norm blew up"
    elif spikes:
        title = "Exploding gradients: spikes in the total norm"
    elif drifting:
        title = "Exploding gradients: the norm's scale keeps growing"
    elif frequent:
        title = "Frequent clipping"
    else:
        title = "Exploding gradients reported by detection"
    return [Finding("exploding", severity, title, evidence, advice)]


def _nonfinite(
    ev: _Evidence, totals: dict[str, Any], info: ModelInfo | None, precision: str | None
) -> list[Finding]:
    bad_layers = [r.name for r in ev.rows if r.nonfinite]
    count = int(totals.get("nonfinite", 0))
    overflows = int(totals.get("amp_overflow", 0))
    if not bad_layers and not count and not overflows:
        return []
    evidence = []
    grads = ev.history.matrix("grad_norm")
    data = grads.filled(0.0)
    bad_columns = np.nonzero((~np.isfinite(data)).any(axis=0))[0]
    if bad_columns.size:
        j = int(bad_columns[0])
        first = [ev.history.layers[i] for i in np.nonzero(~np.isfinite(data[:, j]))[0]]
        evidence.append(
            f"first non-finite gradient at logged step {ev.history.steps[j]} in {len(first)} layer(s): "
            f"{_names(first)}"
        )
    if bad_layers:
        records = sum(r.nonfinite for r in ev.rows)
        evidence.append(
            f"{len(bad_layers)} layer(s) had NaN/Inf gradients ({records} layer-records)"
        )
    if count:
        evidence.append(f"detection counted {count} non-finite step(s)")
    if overflows:
        evidence.append(f"the AMP GradScaler skipped {overflows} step(s) for overflow")
    kind = (precision or "").lower()
    fp16 = kind in _FP16
    if fp16:
        evidence.append(f"precision is {precision!r}: fp16 overflows above 65504")
        advice = [
            "train with precision='bf16-mixed' if the hardware supports it (Ampere+ GPUs, TPUs, CPUs): "
            "bf16 has fp32's exponent range, so gradients do not overflow"
        ]
        if kind in ("16-true", "16", "half", "fp16", "float16") and kind != "16-mixed":
            advice.append(
                "or use precision='16-mixed', which keeps fp32 master weights and scales the loss "
                "(GradScaler) so that overflowing steps are skipped and the scale is lowered"
            )
        else:
            advice.append(
                "or keep '16-mixed' with loss scaling (GradScaler) and a lower init_scale / growth "
                "so overflows stay rare; grad_guard's on_nonfinite='skip' drops the bad steps"
            )
        only_overflows = not bad_layers and not count
        rate = overflows / max(ev.history.records, 1)
        severity: Severity = "info" if only_overflows and rate < 0.05 else "critical"
        return [
            Finding(
                "nonfinite_amp",
                severity,
                "Non-finite gradients under fp16 mixed precision",
                evidence,
                advice,
                bad_layers,
            )
        ]
    advice = [
        "non-finite gradients in full precision come from a diverging run (see exploding gradients) "
        "or from the loss/data: log(0), division by zero, sqrt at 0, NaN inputs; run a few steps "
        "with torch.autograd.set_detect_anomaly(True) to find the operation",
        "lower the learning rate and clip gradients; keep on_nonfinite='skip' so bad steps never "
        "reach the weights",
    ]
    if precision is None:
        advice.append(
            "if this run used fp16 AMP (precision='16-mixed'), switch to 'bf16-mixed' or check "
            "that loss scaling is on"
        )
    elif kind in _BF16:
        evidence.append(
            f"precision is {precision!r} (same exponent range as fp32): not an fp16 overflow"
        )
    return [
        Finding(
            "nonfinite", "critical", "Non-finite (NaN/Inf) gradients", evidence, advice, bad_layers
        )
    ]


def _dead_layers(
    ev: _Evidence, totals: dict[str, Any], info: ModelInfo | None, precision: str | None
) -> list[Finding]:
    dead = [r for r in ev.rows if "dead" in r.flags]
    if not dead:
        return []
    findings = []
    no_grad = [r for r in dead if r.no_grad >= r.zero]
    zero = [r for r in dead if r.no_grad < r.zero]
    streaks = {r.name: ev.history.aggregates[r.name].dead_streak for r in dead}
    if zero:
        evidence = [
            f"{len(zero)} layer(s) had a gradient norm of exactly 0 for the last "
            f"{min(streaks[r.name] for r in zero)}+ logged steps: {_names([r.name for r in zero])}"
        ]
        advice = [
            "dead ReLUs: if every unit feeding the layer is inactive, no gradient flows; a too-large "
            "step can push biases negative for good. Lower the learning rate, use LeakyReLU/GELU, "
            "and He init",
            "check the layer is not multiplied by zero downstream (masking, a "
            "zero-initialised next layer)",
        ]
        if info is not None and info.relu_family:
            evidence.append(f"the model uses {', '.join(info.relu_family)}")
        findings.append(
            Finding(
                "dead_layers",
                "warning",
                "Dead layers: zero gradient",
                evidence,
                advice,
                [r.name for r in zero],
            )
        )
    if no_grad:
        evidence = [
            f"{len(no_grad)} layer(s) got no gradient at all (grad is None) for the last "
            f"{min(streaks[r.name] for r in no_grad)}+ logged steps: {_names([r.name for r in no_grad])}"
        ]
        advice = [
            "frozen by mistake? check the layer is used in forward and not cut off by .detach(), "
            "torch.no_grad() or an unused branch; if it is frozen on purpose, set "
            "requires_grad=False so the optimizer and grad_guard skip it"
        ]
        findings.append(
            Finding(
                "dead_layers",
                "warning",
                "Layers without gradient",
                evidence,
                advice,
                [r.name for r in no_grad],
            )
        )
    return findings


def _update_ratio(
    ev: _Evidence, totals: dict[str, Any], info: ModelInfo | None, precision: str | None
) -> list[Finding]:
    rows = [
        r
        for r in ev.rows
        if r.update_ratio is not None and "dead" not in r.flags and not r.nonfinite
    ]
    if not rows:
        return []
    overall = float(np.median([r.update_ratio for r in rows]))
    factor = ev.limits.update_ratio_factor
    high = [r.name for r in rows if r.update_ratio > HEALTHY_UPDATE_RATIO * factor]
    if overall > HEALTHY_UPDATE_RATIO * factor:
        return [
            Finding(
                "update_ratio_high",
                "warning",
                "Learning rate looks too high",
                [
                    f"median update/parameter ratio over layers is {overall:.2g}, "
                    f"{overall / HEALTHY_UPDATE_RATIO:.0f}x the healthy ~1e-3 (each step rewrites "
                    f"{100 * overall:.1f}% of the weights)",
                    f"{len(high)} layer(s) above {HEALTHY_UPDATE_RATIO * factor:.0e}",
                ],
                ["lower the learning rate by about 10x, or add a warm-up"],
                high,
            )
        ]
    if overall < HEALTHY_UPDATE_RATIO / factor:
        if any("vanishing" in r.flags for r in ev.rows):
            return []  # the vanishing finding already explains why the weights do not move
        return [
            Finding(
                "update_ratio_low",
                "warning",
                "Learning rate looks too low",
                [
                    f"median update/parameter ratio over layers is {overall:.2g}, "
                    f"{HEALTHY_UPDATE_RATIO / overall:.0f}x below the healthy ~1e-3"
                ],
                [
                    "raise the learning rate (try 3-10x), or check a scheduler is not decaying it too early"
                ],
                [r.name for r in rows],
            )
        ]
    return []


# ---------------------------------------------------------------------- helpers


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, np.integer):
        return int(value)
    return value


def _isatty(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


def log_dir(trainer: Any) -> str | None:
    """Where the report of ``trainer`` goes: its first logger's ``log_dir``, else the root dir."""
    for logger in getattr(trainer, "loggers", []) or []:
        directory = getattr(logger, "log_dir", None)
        if directory:
            return str(directory)
    root = getattr(trainer, "default_root_dir", None)
    return str(root) if root else None


def report_for_trainer(
    trainer: Any,
    pl_module: Any,
    history: GradientHistory,
    print_report: bool = True,
    directory: str | None = None,
    **kwargs: Any,
) -> Report | None:
    """Build, print and write the report at the end of ``trainer.fit`` (global rank zero only).

    Writes ``grad_guard_report.json``/``.md`` (and the PNG pictures when matplotlib is
    installed) into ``directory`` or the logger's log directory. Extra keyword arguments
    go to :func:`build_report`.
    """
    if not bool(getattr(trainer, "is_global_zero", True)):
        return None
    precision = (
        kwargs.pop("precision", None) or str(getattr(trainer, "precision", "") or "") or None
    )
    report = build_report(history, model=pl_module, precision=precision, **kwargs)
    if print_report:
        report.print()
    target = directory or log_dir(trainer)
    if target:
        report.write(target)
        from grad_guard import plots

        if len(history) and plots.available():
            plots.save_pictures(history, target)
    return report
