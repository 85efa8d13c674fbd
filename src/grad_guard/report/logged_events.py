"""Anomaly events read back from the TensorBoard text tag ``grad_guard/anomaly_events``.

Detection writes one Markdown entry per event. Its first line is the contract::

    **<kind>** at step <step> — action `<action>`

and what follows (a ``| layer | gradient norm |`` table, then details such as
``threshold 1e+03 (spike); total norm 5e+03; likely origin `net.2```) is read when
present, so the report can name the layers and numbers of each event.

Example:
    >>> entry = "**exploding** at step 40 — action `skip`\\n\\n| layer | gradient norm |\\n"
    >>> entry += "|---|---|\\n| `fc1` | 3e+03 |\\n\\nthreshold 10 (max_total_norm); total norm 3e+03"
    >>> event = parse_event_markdown(entry)
    >>> event["kind"], event["step"], event["action"], event["layers"], event["values"]
    ('exploding', 40, 'skip', ['fc1'], [3000.0])
    >>> event["threshold"], event["rule"], event["total_norm"]
    (10.0, 'max_total_norm', 3000.0)
"""

from __future__ import annotations

import math
import re
from typing import Any

EVENTS_TAG = "grad_guard/anomaly_events"
"""TensorBoard text tag of the anomaly events."""

EVENT_KINDS = ("nonfinite", "exploding", "vanishing", "loss_spike", "amp_overflow")

_FIRST_LINE = re.compile(
    r"^\*\*(?P<kind>[\w-]+)\*\* at step (?P<step>-?\d+) — action `(?P<action>[^`]*)`"
)
_ROW = re.compile(r"^\|\s*`?(?P<name>[^`|]+?)`?\s*\|\s*(?P<value>[^|]+?)\s*\|$")
_THRESHOLD = re.compile(r"threshold (?P<value>\S+) \((?P<rule>[^)]*)\)")
_TOTAL = re.compile(r"total norm (?P<value>\S+)")
_ORIGIN = re.compile(r"likely origin `(?P<origin>[^`]*)`")
_OCCURRENCES = re.compile(r"(?P<count>\d+) steps")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def parse_event_markdown(text: str) -> dict[str, Any] | None:
    """One logged event as a dict like ``AnomalyEvent.to_dict()``; ``None`` if not an event.

    Args:
        text: the Markdown of one ``grad_guard/anomaly_events`` entry.

    Returns:
        ``{"step", "kind", "action", "layers", "values", "threshold", "rule",
        "total_norm", "origin", "occurrences"}``; the keys after ``values`` are ``None``
        (``occurrences`` 1) where the entry does not say.
    """
    lines = text.strip().splitlines()
    match = _FIRST_LINE.match(lines[0].strip()) if lines else None
    if match is None:
        return None
    event: dict[str, Any] = {
        "step": int(match["step"]),
        "kind": match["kind"],
        "action": match["action"],
        "layers": [],
        "values": [],
        "threshold": None,
        "rule": None,
        "total_norm": None,
        "origin": None,
        "occurrences": 1,
    }
    details = ""
    for line in lines[1:]:
        line = line.strip()
        row = _ROW.match(line)
        if row and not set(row["name"]) <= set("-") and row["name"] != "layer":
            event["layers"].append(row["name"].strip())
            event["values"].append(_number(row["value"]))
        elif line and not line.startswith("|"):
            details = line
    if (found := _THRESHOLD.search(details)) is not None:
        event["threshold"], event["rule"] = _number(found["value"]), found["rule"]
    if (found := _TOTAL.search(details)) is not None:
        event["total_norm"] = _number(found["value"])
    if (found := _ORIGIN.search(details)) is not None:
        event["origin"] = found["origin"]
    if (found := _OCCURRENCES.search(details)) is not None:
        event["occurrences"] = int(found["count"])
    return event


def parse_events_markdown(text: str) -> list[dict[str, Any]]:
    """Every event in one text entry (one per entry is the rule; several are accepted).

    Example:
        >>> text = "**vanishing** at step 3 — action `warn`\\n**exploding** at step 3 — action `skip`"
        >>> [e["kind"] for e in parse_events_markdown(text)]
        ['vanishing', 'exploding']
    """
    chunks: list[list[str]] = []
    for line in text.strip().splitlines():
        if _FIRST_LINE.match(line.strip()) or not chunks:
            chunks.append([])
        chunks[-1].append(line)
    events = [parse_event_markdown("\n".join(chunk)) for chunk in chunks]
    return [e for e in events if e is not None]


def describe_event(event: dict[str, Any], most_layers: int = 3) -> str:
    """One line for the report, e.g. ``"step 40: exploding (action skip) in fc1 (3e+03)"``.

    Example:
        >>> describe_event({"step": 7, "kind": "nonfinite", "action": "skip",
        ...                 "layers": ["a", "b"], "values": [float("nan"), 1.0]})
        'step 7: nonfinite (action skip) in a (nan), b (1)'
    """
    text = f"step {event.get('step')}: {event.get('kind')} (action {event.get('action')})"
    layers = list(event.get("layers") or [])
    values = list(event.get("values") or [])
    if layers:
        named = [
            f"{name} ({_short(values[i])})" if i < len(values) else str(name)
            for i, name in enumerate(layers[:most_layers])
        ]
        more = f", +{len(layers) - most_layers} more" if len(layers) > most_layers else ""
        text += " in " + ", ".join(named) + more
    if event.get("origin"):
        text += f"; likely origin {event['origin']}"
    if event.get("total_norm") is not None:
        text += f"; total norm {_short(event['total_norm'])}"
    return text


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "inf" from a JSON-safe dict
        return value
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.2g}" if value else "0"
