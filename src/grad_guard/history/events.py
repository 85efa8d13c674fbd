"""Anomaly events as the history keeps them: plain Python data."""

from __future__ import annotations

import dataclasses
from typing import Any

from grad_guard.jsonsafe import plain


def event_to_dict(event: Any) -> dict[str, Any]:
    """An anomaly event (dataclass or mapping) as plain, JSON-friendly Python data.

    Example:
        >>> event_to_dict({"step": 3, "kind": "nonfinite", "layers": ("fc1",)})
        {'step': 3, 'kind': 'nonfinite', 'layers': ['fc1']}
    """
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return plain(dataclasses.asdict(event))
    return plain(dict(event))
