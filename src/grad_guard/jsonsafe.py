"""One conversion to plain data for everything grad_guard writes as JSON or keeps as state.

Strict JSON (``json.dumps(..., allow_nan=False)``, browsers' ``JSON.parse``) has no
NaN or Infinity. grad_guard's numbers do (a non-finite gradient norm is the news), so
every report, results file and dashboard route converts with :func:`json_safe`, and
all of them say the same thing about the same value:

* ``NaN`` -> ``None`` (``null``): not a number, nothing to plot;
* ``+inf`` / ``-inf`` -> the strings ``"inf"`` / ``"-inf"``: an overflow is not the
  same as a missing value, and :func:`from_json_number` turns them back;
* tensors, numpy arrays and numpy scalars -> Python numbers and lists (``.tolist()``);
* mappings -> ``dict`` with ``str`` keys; tuples, lists and sets -> lists;
* dataclass instances -> their fields (``dataclasses.asdict``).

:func:`plain` is the same walk that keeps NaN/Inf as floats: for state that stays in
Python (checkpoints, events in memory), where a NaN is a valid float.

Example:
    >>> json_safe({"a": float("nan"), "b": (1.0, float("inf")), 3: -float("inf")})
    {'a': None, 'b': [1.0, 'inf'], '3': '-inf'}
    >>> import json
    >>> json.dumps(json_safe([float("nan")]), allow_nan=False)
    '[null]'
    >>> plain({"values": (float("inf"),)})
    {'values': [inf]}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

INF = "inf"
NEG_INF = "-inf"


def json_safe(value: Any) -> Any:
    """``value`` as data that ``json.dumps(..., allow_nan=False)`` accepts.

    Args:
        value: any mix of mappings, sequences, dataclasses, numbers, strings, ``None``,
            tensors and numpy values.

    Returns:
        A new object (``value`` is not changed). Objects of other types are returned as
        they are.
    """
    return _walk(value, _json_float)


def plain(value: Any) -> Any:
    """``value`` as plain Python data (as :func:`json_safe`, but NaN/Inf stay floats).

    Example:
        >>> import numpy as np
        >>> plain({"step": np.int64(3), "layers": ("fc1",), "norm": np.float32(0.5)})
        {'step': 3, 'layers': ['fc1'], 'norm': 0.5}
    """
    return _walk(value, float)


def _walk(value: Any, on_float: Callable[[float], Any]) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return on_float(float(value))  # float(): numpy's float64 is a float subclass
    if isinstance(value, Mapping):
        return {str(k): _walk(v, on_float) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_walk(v, on_float) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _walk(dataclasses.asdict(value), on_float)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):  # numpy scalars/arrays, torch tensors
        return _walk(tolist(), on_float)
    return value


def _json_float(value: float) -> float | str | None:
    if math.isnan(value):
        return None
    if math.isinf(value):
        return INF if value > 0 else NEG_INF
    return value


def from_json_number(value: Any) -> float | None:
    """Inverse of :func:`json_safe` for one number: ``"inf"`` -> ``inf``, ``None`` -> ``None``.

    Example:
        >>> from_json_number("-inf"), from_json_number(2), from_json_number(None)
        (-inf, 2.0, None)
    """
    if value is None:
        return None
    if value == INF:
        return math.inf
    if value == NEG_INF:
        return -math.inf
    return float(value)
