"""Precision names: which ones Lightning accepts and which ones are fp16 or bf16."""

from __future__ import annotations

PRECISIONS: tuple[str, ...] = (
    "64-true",
    "64",
    "32-true",
    "32",
    "16-mixed",
    "16-true",
    "16",
    "bf16-mixed",
    "bf16-true",
    "bf16",
    "transformer-engine",
    "transformer-engine-float16",
)
"""The ``Trainer(precision=...)`` strings of Lightning 2.x."""

FP16: frozenset[str] = frozenset({"16", "16-mixed", "16-true", "fp16", "half", "float16"})
BF16: frozenset[str] = frozenset({"bf16", "bf16-mixed", "bf16-true", "bfloat16"})
TRUE_FP16: frozenset[str] = frozenset({"16-true", "half", "fp16", "float16"})
"""fp16 without fp32 master weights or loss scaling (Lightning reads "16" as "16-mixed")."""


def check_precision(value: str | None) -> str | None:
    """``value`` if it is a Lightning precision (or ``None``).

    Raises:
        ValueError: naming the value and the allowed ones.

    Example:
        >>> check_precision("bf16-mixed")
        'bf16-mixed'
        >>> check_precision("17-mixed")
        Traceback (most recent call last):
        ...
        ValueError: `precision` must be one of 64-true, 64, 32-true, 32, 16-mixed, 16-true, 16, bf16-mixed, bf16-true, bf16, transformer-engine, transformer-engine-float16, got '17-mixed'
    """
    if value is None or value in PRECISIONS:
        return value
    raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {value!r}")
