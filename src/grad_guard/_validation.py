"""Argument checks shared by the core and the callbacks.

Every check raises a ``ValueError`` that names the argument, the value given and what is
allowed, so a typo in a config fails at construction with a message a person can act on.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(argument: str, value: T, allowed: Collection[T]) -> T:
    """Return ``value`` if it is one of ``allowed``.

    Example:
        >>> check_choice("on_nonfinite", "skip", ("skip", "warn"))
        'skip'
        >>> check_choice("on_nonfinite", "ignore", ("skip", "warn"))
        Traceback (most recent call last):
        ...
        ValueError: `on_nonfinite` must be one of 'skip', 'warn', got 'ignore'
    """
    if value not in allowed:
        choices = ", ".join(repr(choice) for choice in allowed)
        raise ValueError(f"`{argument}` must be one of {choices}, got {value!r}")
    return value


def check_bool(argument: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool`` (a string like ``"false"`` is not).

    Example:
        >>> check_bool("report", "false")
        Traceback (most recent call last):
        ...
        ValueError: `report` must be True or False, got 'false'
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False, got {value!r}")
    return value


def check_int(argument: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Any:
    """Return ``value`` if it is an ``int`` >= ``minimum`` (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"`{argument}` must be an int >= {minimum}{none}, got {value!r}")
    return value


def check_float(
    argument: str,
    value: Any,
    minimum: float | None = 0.0,
    maximum: float | None = None,
    *,
    inclusive_min: bool = False,
    inclusive_max: bool = True,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> Any:
    """Return ``float(value)`` if it is a real number within the bounds.

    Example:
        >>> check_float("max_norm", 1)
        1.0
        >>> check_float("max_norm", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: `max_norm` must be a number > 0, got -1.0
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if ok and math.isnan(number):
        ok = False
    if ok and math.isinf(number) and not allow_inf:
        ok = False
    if ok and minimum is not None:
        ok = number >= minimum if inclusive_min else number > minimum
    if ok and maximum is not None:
        ok = number <= maximum if inclusive_max else number < maximum
    if not ok:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>=' if inclusive_min else '>'} {minimum:g}")
        if maximum is not None:
            bounds.append(f"{'<=' if inclusive_max else '<'} {maximum:g}")
        extra = " or None" if allow_none else ""
        raise ValueError(
            f"`{argument}` must be a number {' and '.join(bounds) or ''}{extra}".rstrip()
            + f", got {value!r}"
        )
    return number
