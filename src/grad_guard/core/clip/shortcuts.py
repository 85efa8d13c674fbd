"""String shortcuts for the clipping algorithms (``"zscore"`` -> ``ZClip()``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from grad_guard._validation import check_choice
from grad_guard.core.clip.agc import AGC
from grad_guard.core.clip.autoclip import AutoClip
from grad_guard.core.clip.base import ClipAlgorithm
from grad_guard.core.clip.norm import NormClip
from grad_guard.core.clip.value import ValueClip
from grad_guard.core.clip.zclip import ZClip

ClipShortcut = Literal["norm", "value", "autoclip", "zscore", "agc"]
"""The names :func:`resolve_algorithm` accepts (LightningCLI checks them at parse time)."""

#: shortcut -> the algorithm it builds, with its defaults
SHORTCUTS: dict[str, Callable[[], ClipAlgorithm]] = {
    "norm": lambda: NormClip(max_norm=1.0),
    "value": lambda: ValueClip(clip_value=1.0),
    "autoclip": AutoClip,
    "zscore": ZClip,
    "agc": AGC,
}


def resolve_algorithm(
    algorithm: ClipAlgorithm | ClipShortcut, argument: str = "algorithm"
) -> ClipAlgorithm:
    """The algorithm object for ``algorithm`` (an object, or a shortcut of :data:`SHORTCUTS`).

    Args:
        algorithm: a :class:`ClipAlgorithm`, or one of ``"norm"`` (``NormClip(1.0)``),
            ``"value"`` (``ValueClip(1.0)``), ``"autoclip"``, ``"zscore"`` (``ZClip()``),
            ``"agc"``.
        argument: the argument name used in the error message.

    Raises:
        ValueError: if ``algorithm`` is neither.

    Example:
        >>> resolve_algorithm("norm")
        NormClip(max_norm=1.0, norm_type=2.0, per_parameter=False)
    """
    if isinstance(algorithm, ClipAlgorithm):
        return algorithm
    if not isinstance(algorithm, str):
        raise ValueError(
            f"`{argument}` must be a clipping algorithm object (NormClip, ValueClip, AutoClip, "
            f"ZClip, AGC) or one of {', '.join(map(repr, SHORTCUTS))}, got {algorithm!r}"
        )
    return SHORTCUTS[check_choice(argument, algorithm, tuple(SHORTCUTS))]()
