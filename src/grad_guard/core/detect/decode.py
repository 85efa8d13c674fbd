"""Decode the packed findings, copied to the host, into :class:`Findings` (host side)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from grad_guard.core.detect.findings import (
    LAYER_KINDS,
    NAN_CODE,
    NUM_SCALARS,
    S_AGE,
    S_AMP_COUNT,
    S_AMP_NOW,
    S_COUNT,
    S_LOSS,
    S_LOSS_RULE,
    S_NOW,
    S_RATIO_RULE,
    S_SPIKE_RULE,
    S_THRESHOLD,
    S_TOTAL,
    Findings,
    KindFindings,
)
from grad_guard.core.events import KINDS

_RULES_OF = {  # kind -> (rule when the flag slot is 1, rule when it is 0)
    "exploding": ("spike", "max_total_norm"),
    "vanishing": ("min_ratio", "min_norm"),
    "loss_spike": ("loss_spike", "nonfinite_loss"),
}


def decode_findings(
    values: Sequence[float], layer_names: Sequence[str], steps: Sequence[int], updates: int
) -> Findings:
    """The :class:`Findings` of a packed findings tensor copied to the host.

    Args:
        values: the packed tensor as host floats (see :mod:`~grad_guard.core.detect.findings`).
        layer_names: the layers, in the packed order.
        steps: the step numbers the pending flags cover, oldest first (an age ``a``
            names ``steps[-a]``).
        updates: how many updates the flags cover.
    """
    scalars = values[:NUM_SCALARS]
    if not any(scalars[S_COUNT : S_COUNT + len(KINDS)]) and not scalars[S_AMP_COUNT]:
        return _nothing(updates)  # the common case: one look at five slots
    num_layers = len(layer_names)
    blocks = values[NUM_SCALARS:]
    kinds = []
    for k, kind in enumerate(KINDS):
        count = round(scalars[S_COUNT + k])
        age = round(scalars[S_AGE + k])
        chosen: list[int] = []
        active: tuple[str, ...] = ()
        layer_values: tuple[float, ...] = ()
        if k < LAYER_KINDS:
            row_any = blocks[k * num_layers : (k + 1) * num_layers]
            row_now = blocks[
                (LAYER_KINDS + k) * num_layers : (LAYER_KINDS + k + 1) * num_layers
            ]
            row_values = blocks[(2 * LAYER_KINDS + k) * num_layers :][:num_layers]
            chosen = [i for i, flag in enumerate(row_any) if flag > 0.5]
            active = tuple(layer_names[i] for i, flag in enumerate(row_now) if flag > 0.5)
            layer_values = tuple(
                math.nan if row_values[i] == NAN_CODE else float(row_values[i]) for i in chosen
            )
        rule, threshold = kind, None
        if kind in _RULES_OF:
            flag_slot = {"exploding": S_SPIKE_RULE, "vanishing": S_RATIO_RULE}.get(
                kind, S_LOSS_RULE
            )
            rule = _RULES_OF[kind][0 if scalars[flag_slot] > 0.5 else 1]
            if rule != "nonfinite_loss":
                threshold = float(scalars[S_THRESHOLD + k])
        kinds.append(
            KindFindings(
                kind=kind,
                count=count,
                first_step=steps[max(0, len(steps) - age)] if count and age else None,
                now=scalars[S_NOW + k] > 0.5,
                layers=tuple(layer_names[i] for i in chosen),
                values=layer_values,
                active=active,
                threshold=threshold if count else None,
                rule=rule if count else "",
                total_norm=float(scalars[S_TOTAL]) if count and kind == "exploding" else None,
                loss=float(scalars[S_LOSS]) if count and kind == "loss_spike" else None,
            )
        )
    return Findings(
        *kinds,
        amp_overflows=round(scalars[S_AMP_COUNT]),
        amp_now=scalars[S_AMP_NOW] > 0.5,
        updates=updates,
    )


def _nothing(updates: int) -> Findings:
    """The :class:`Findings` of a read in which no rule fired."""
    kinds = (
        KindFindings(kind, 0, None, False, (), (), (), None, "") for kind in KINDS
    )
    return Findings(*kinds, amp_overflows=0, amp_now=False, updates=updates)
