"""Old import path of the offline datasets, kept working: see :mod:`grad_guard.demo.data`.

Example:
    >>> from grad_guard.data import digits_dataset
    >>> from grad_guard.demo import data
    >>> digits_dataset is data.digits_dataset
    True
"""

from __future__ import annotations

from grad_guard.demo.data import (
    DIGITS_CLASSES,
    DIGITS_FEATURES,
    DIGITS_SAMPLES,
    DIGITS_SHAPE,
    digits_dataset,
    digits_loader,
    make_loader,
    synthetic_dataset,
)

__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_FEATURES",
    "DIGITS_SAMPLES",
    "DIGITS_SHAPE",
    "digits_dataset",
    "digits_loader",
    "make_loader",
    "synthetic_dataset",
]
