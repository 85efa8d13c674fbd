"""Argument checks shared by the core and the callbacks.

Every check raises a ``ValueError`` that names the argument, the value given and what is
allowed, so a typo in a config fails at construction with a message a person can act on.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: Reprs longer than this are shortened in messages (a model's repr runs to pages).
_MAX_REPR = 120


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, shortened when it is long.

    Example:
        >>> shown("sgd")
        "'sgd'"
        >>> shown(list(range(100)))[:20]
        'list [0, 1, 2, 3, 4,'
    """
    text = repr(value)
    if len(text) <= _MAX_REPR:
        return text
    return f"{type(value).__name__} {text[: _MAX_REPR - 20]}...".replace("\n", " ")


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy.bool_ too


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (``numpy`` integers count; ``1.0`` does not)."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (``numpy`` scalars count; strings do not)."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _same_choice(value: Any, choice: Any) -> bool:
    """``value == choice`` without ``True == 1`` or an unhashable value raising."""
    if _is_bool(value) != _is_bool(choice) or not isinstance(value, type(choice)):
        return False
    return bool(value == choice)


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
    # `True in (1, 2)` is True and `1.0 in ("a",)` is False: compare types too, so that a
    # bool never passes for a number and an unhashable value never raises a TypeError
    if not any(_same_choice(value, choice) for choice in allowed):
        choices = ", ".join(repr(choice) for choice in allowed)
        raise ValueError(f"`{argument}` must be one of {choices}, got {shown(value)}")
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
        raise ValueError(f"`{argument}` must be True or False, got {shown(value)}")
    return value


def check_int(argument: str, value: Any, minimum: int = 1, allow_none: bool = False) -> Any:
    """Return ``int(value)`` if it is an integer >= ``minimum`` (or ``None`` when allowed).

    Bools, floats (``1.0``) and numeric strings (``"1"``) are refused.

    Example:
        >>> check_int("window", 8)
        8
        >>> check_int("window", True)
        Traceback (most recent call last):
        ...
        ValueError: `window` must be an int >= 1, got True
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < minimum:
        none = " or None" if allow_none else ""
        raise ValueError(f"`{argument}` must be an int >= {minimum}{none}, got {shown(value)}")
    return int(value)


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
    ok = _is_real(value)
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
            + f", got {shown(value)}"
        )
    return number


def check_norm_type(argument: str, value: Any, allow_none: bool = False) -> Any:
    """Return the p of a p-norm as a float: a positive number, ``float("inf")`` or ``"inf"``.

    Bools (``True`` is not ``1.0``), numeric strings (``"2"``) and any other string
    (``"inf "``, ``"fro"``) are refused.

    Example:
        >>> check_norm_type("norm_type", "inf")
        inf
        >>> check_norm_type("norm_type", True)
        Traceback (most recent call last):
        ...
        ValueError: `norm_type` must be a positive number, float('inf') or 'inf', got True
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value == "inf":
        return math.inf
    if _is_real(value) and float(value) > 0:  # NaN fails the comparison
        return float(value)
    extra = " or None" if allow_none else ""
    raise ValueError(
        f"`{argument}` must be a positive number, float('inf') or 'inf'{extra}, got {shown(value)}"
    )


def check_patterns(argument: str, value: Any) -> list[re.Pattern[str]]:
    """Compile include/exclude regexes: ``None``, one string, or a list/tuple of strings.

    A dict, a set, an int or bytes is refused (a dict would otherwise be read as its
    keys), as is an invalid regex; the message names ``argument``.

    Example:
        >>> [p.pattern for p in check_patterns("include", ["^enc", "head$"])]
        ['^enc', 'head$']
        >>> check_patterns("include", {"enc": 1})
        Traceback (most recent call last):
        ...
        ValueError: `include` must be a regex string, a list of regex strings or None, got {'enc': 1}
        >>> check_patterns("exclude", "(")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `exclude` must hold valid regexes, got '(' (missing ), ...)
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    # any sequence (an OmegaConf ListConfig from Hydra too), but not bytes
    is_sequence = isinstance(items, Sequence) and not isinstance(items, (bytes, bytearray))
    if not is_sequence or not all(isinstance(p, str) for p in items):
        raise ValueError(
            f"`{argument}` must be a regex string, a list of regex strings or None, "
            f"got {shown(value)}"
        )
    compiled = []
    for pattern in items:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            where = "" if isinstance(value, str) else f" in {shown(value)}"
            raise ValueError(
                f"`{argument}` must hold valid regexes, got {pattern!r}{where} ({err})"
            ) from err
    return compiled


def check_optional_path(argument: str, value: Any) -> str | None:
    """Return a directory/file argument as a ``str``: a non-empty ``str`` or path, or ``None``.

    Example:
        >>> check_optional_path("report_dir", None) is None
        True
        >>> check_optional_path("report_dir", 5)
        Traceback (most recent call last):
        ...
        ValueError: `report_dir` must be a path (str or os.PathLike) or None, got 5
    """
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"`{argument}` must be a path (str or os.PathLike) or None, got {shown(value)}"
        )
    return value


def check_optional_str(argument: str, value: Any) -> str | None:
    """Return ``value`` if it is a non-empty ``str`` or ``None``.

    Example:
        >>> check_optional_str("name", "")
        Traceback (most recent call last):
        ...
        ValueError: `name` must be a non-empty string or None, got ''
    """
    if value is None or (isinstance(value, str) and value):
        return value
    raise ValueError(f"`{argument}` must be a non-empty string or None, got {shown(value)}")


def check_instance(
    argument: str,
    value: Any,
    types: type | tuple[type, ...],
    allowed: str,
    allow_none: bool = False,
) -> Any:
    """Return ``value`` if it is an instance of ``types`` (or ``None`` when allowed).

    Args:
        argument: the argument's name, for the message.
        value: what was given.
        types: the accepted class or classes.
        allowed: what is allowed, in words (``"a torch.optim.Optimizer"``).
        allow_none: accept ``None`` too.

    Raises:
        TypeError: naming ``argument``, the value given and ``allowed``.

    Example:
        >>> import torch
        >>> check_instance("optimizer", "sgd", torch.optim.Optimizer, "a torch.optim.Optimizer")
        Traceback (most recent call last):
        ...
        TypeError: `optimizer` must be a torch.optim.Optimizer, got 'sgd' (str)
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, types):
        none = " or None" if allow_none else ""
        raise TypeError(
            f"`{argument}` must be {allowed}{none}, got {shown(value)} ({type(value).__name__})"
        )
    return value
