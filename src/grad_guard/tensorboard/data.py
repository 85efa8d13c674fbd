"""Read grad_guard's tags through TensorBoard's data provider, as JSON-ready data.

Everything goes through ``context.data_provider`` (``list_scalars``/``read_scalars``,
``list_tensors``/``read_tensors``), so the dashboard reads whatever TensorBoard can open:
local folders, the Rust data server, remote file systems. Values keep TensorBoard's
float32 precision; non-finite values become the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` (JSON has no NaN), and a layer without a value on a step is ``null``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from grad_guard.tensorboard import order

SCALARS_PLUGIN = "scalars"
TEXT_PLUGIN = "text"
EVENTS_TAG = "grad_guard/anomaly_events"
CONFIG_TAG = "grad_guard/config"
SUMMARY = "grad_guard"
QUANTITIES: tuple[str, ...] = (
    "grad_norm",
    "param_norm",
    "grad_to_param",
    "update_ratio",
    "activation_mean",
    "activation_std",
    "saturated_fraction",
    "dead_fraction",
    "nonfinite_fraction",
)
"""Per-layer tag prefixes the heatmap route serves."""
DOWNSAMPLE = 100_000
"""Points asked of the provider per series (it keeps at most ``--samples_per_plugin``)."""

_EVENT_LINE = re.compile(
    r"^\*\*(?P<kind>[A-Za-z_]+)\*\* at step (?P<step>-?\d+) — action `(?P<action>[^`]*)`"
)


def json_value(value: float) -> float | str:
    """A float as JSON can carry it.

    Example:
        >>> [json_value(v) for v in (0.5, float("nan"), float("inf"), -float("inf"))]
        [0.5, 'NaN', 'Infinity', '-Infinity']
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def parse_events(text: str, step: int) -> list[dict[str, Any]]:
    """The anomaly events in one ``grad_guard/anomaly_events`` text entry.

    Each event starts with the line ``**<kind>** at step <step> — action `<action>```;
    the lines up to the next event are its details.

    Args:
        text: the markdown text of the entry.
        step: the step TensorBoard stored it at (used if the header has none).

    Example:
        >>> parse_events("**nonfinite** at step 5 — action `skip`\\n\\nlikely origin `fc1`", 5)
        [{'step': 5, 'kind': 'nonfinite', 'action': 'skip', 'text': '**nonfinite** at step 5 — action `skip`\\n\\nlikely origin `fc1`'}]
    """
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        match = _EVENT_LINE.match(line.strip())
        if match:
            events.append(
                {
                    "step": int(match["step"]),
                    "kind": match["kind"],
                    "action": match["action"],
                    "text": line.strip(),
                }
            )
        elif events:
            events[-1]["text"] += "\n" + line
    for event in events:
        event["text"] = event["text"].rstrip()
    if not events and text.strip():
        events.append({"step": step, "kind": "unknown", "action": "", "text": text.strip()})
    return events


def _text_of(datum: Any) -> str:
    values = datum.numpy.reshape(-1).tolist() if hasattr(datum.numpy, "reshape") else [datum.numpy]
    parts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]
    return "\n".join(parts)


class RunData:
    """grad_guard's data of the runs of one TensorBoard instance.

    Args:
        provider: TensorBoard's data provider (``context.data_provider``).
        logdir: the ``--logdir`` (to find a run's files for the layer order and the
            report; may be empty).

    Example::

        data = RunData(context.data_provider, context.logdir)
        data.heatmap(ctx, experiment, run="version_0", quantity="grad_norm")
    """

    def __init__(self, provider: Any, logdir: str | None) -> None:
        self.provider = provider
        self.logdir = logdir or ""
        # the in-process multiplexer lists tags in first-written order; the Rust one doesn't
        self.provider_ordered = type(provider).__name__ == "MultiplexerDataProvider"
        self._order = functools.lru_cache(maxsize=256)(self._order_uncached)

    # ------------------------------------------------------------------ listing
    def scalar_tags(self, ctx: Any, experiment: str) -> dict[str, list[str]]:
        """run -> its scalar tags, as the provider lists them."""
        listing = self.provider.list_scalars(
            ctx, experiment_id=experiment, plugin_name=SCALARS_PLUGIN
        )
        return {run: list(tags) for run, tags in listing.items()}

    def has_data(self, ctx: Any, experiment: str) -> bool:
        """Whether any run has a ``grad_norm/`` scalar."""
        return any(
            tag.startswith("grad_norm/")
            for tags in self.scalar_tags(ctx, experiment).values()
            for tag in tags
        )

    def runs(self, ctx: Any, experiment: str) -> list[dict[str, Any]]:
        """The runs with grad_guard data: ``run``, ``quantities``, ``layers``, ``config``."""
        result = []
        for run, tags in sorted(self.scalar_tags(ctx, experiment).items()):
            quantities = [q for q in QUANTITIES if any(t.startswith(q + "/") for t in tags)]
            if "grad_norm" not in quantities:
                continue
            layers = sum(t.startswith("grad_norm/") for t in tags)
            result.append(
                {
                    "run": run,
                    "quantities": quantities,
                    "layers": layers,
                    "clipping": any(t.startswith(f"{SUMMARY}/clip/") for t in tags),
                    "config": self.config(ctx, experiment, run),
                }
            )
        return result

    # ------------------------------------------------------------------ scalars
    def read(
        self, ctx: Any, experiment: str, run: str, tags: list[str]
    ) -> dict[str, dict[int, float]]:
        """tag -> {step: value} (the last value when a step repeats)."""
        if not tags:
            return {}
        from tensorboard.data import provider as tb_provider

        data = self.provider.read_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=SCALARS_PLUGIN,
            downsample=DOWNSAMPLE,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=tags),
        )
        series = data.get(run, {})
        return {tag: {p.step: p.value for p in series.get(tag, [])} for tag in tags}

    def _order_uncached(self, run: str, tags: tuple[str, ...]) -> tuple[str, ...]:
        run_dir = order.run_directory(self.logdir, run)
        return tuple(order.forward_order(list(tags), run_dir, self.provider_ordered))

    def heatmap(self, ctx: Any, experiment: str, run: str, quantity: str) -> dict[str, Any]:
        """One quantity of every layer: ``layers`` (input first), ``steps``, ``values``.

        Raises:
            ValueError: if ``quantity`` is not one of :data:`QUANTITIES`.
            KeyError: if ``run`` is not a run with grad_guard data.
        """
        if quantity not in QUANTITIES:
            raise ValueError(f"tag={quantity!r} is not one of {list(QUANTITIES)}")
        all_tags = self.scalar_tags(ctx, experiment)
        if run not in all_tags:
            raise KeyError(f"run={run!r} is not a run TensorBoard knows ({sorted(all_tags)})")
        listed = [t for t in all_tags[run] if t.startswith(quantity + "/")]
        tags = list(self._order(run, tuple(listed))) if listed else []
        values = self.read(ctx, experiment, run, tags)
        steps = sorted({step for series in values.values() for step in series})
        rows = []
        for tag in tags:
            series = values[tag]
            rows.append([json_value(series[s]) if s in series else None for s in steps])
        return {
            "run": run,
            "tag": quantity,
            "layers": [t[len(quantity) + 1 :] for t in tags],
            "steps": steps,
            "values": rows,
        }

    def timeline(self, ctx: Any, experiment: str, run: str) -> dict[str, Any]:
        """Run-level series: totals, clipping, counters, as tag -> [[step, value], ...]."""
        tags = [
            t for t in self.scalar_tags(ctx, experiment).get(run, []) if t.startswith(SUMMARY + "/")
        ]
        values = self.read(ctx, experiment, run, tags)
        return {
            "run": run,
            "series": {
                tag[len(SUMMARY) + 1 :]: [[s, json_value(v)] for s, v in sorted(series.items())]
                for tag, series in values.items()
            },
        }

    # ------------------------------------------------------------------ text
    def texts(self, ctx: Any, experiment: str, run: str, tag: str) -> list[tuple[int, str]]:
        """(step, text) of every entry of a text tag of ``run``, by step."""
        from tensorboard.data import provider as tb_provider

        listing = self.provider.list_tensors(ctx, experiment_id=experiment, plugin_name=TEXT_PLUGIN)
        # torch's SummaryWriter.add_text stores the text under "<tag>/text_summary"
        tags = [t for t in (tag, f"{tag}/text_summary") if t in listing.get(run, {})]
        if not tags:
            return []
        data = self.provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=TEXT_PLUGIN,
            downsample=DOWNSAMPLE,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=tags),
        )
        series = data.get(run, {})
        entries = [(d.step, _text_of(d)) for t in tags for d in series.get(t, [])]
        return sorted(entries, key=lambda e: e[0])

    def events(self, ctx: Any, experiment: str, run: str) -> list[dict[str, Any]]:
        """The anomaly events of ``run`` (``step``, ``kind``, ``action``, ``text``), by step."""
        events = []
        for step, text in self.texts(ctx, experiment, run, EVENTS_TAG):
            events += parse_events(text, step)
        return sorted(events, key=lambda e: e["step"])

    def config(self, ctx: Any, experiment: str, run: str) -> Mapping[str, Any] | None:
        """The run's ``grad_guard/config`` JSON object, or ``None``."""
        entries = self.texts(ctx, experiment, run, CONFIG_TAG)
        for _, text in reversed(entries):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
        return None
