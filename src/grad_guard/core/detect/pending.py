"""What the rules found since the last read, accumulated on the device in few ops a step.

The accumulator *is* the packed layout of :mod:`grad_guard.core.detect.findings`: one
float tensor, so a read copies it as it is and a clear is one new zero tensor. A step lays its
findings out as one row of the same layout and folds it in with a handful of element-wise
ops, each slot by its own rule: counts add, ages grow, "now" slots are replaced,
thresholds, details and layer values are replaced where their flag fired, and the
"involved since the last read" flags are OR-ed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from grad_guard.core.detect.findings import (
    LAYER_KINDS,
    NAN_CODE,
    NUM_KINDS,
    NUM_SCALARS,
    S_AGE,
    S_AMP_COUNT,
    S_AMP_NOW,
    S_COUNT,
    S_NOW,
    S_THRESHOLD,
    S_TOTAL,
    packed_size,
)

# details slots (S_TOTAL, S_SPIKE_RULE, S_RATIO_RULE, S_LOSS, S_LOSS_RULE) follow the
# flag of: exploding, exploding, vanishing, loss_spike, loss_spike
_DETAIL_OWNERS = (1, 1, 2, 3, 3)


def _slot_rules(num_layers: int) -> tuple[list[bool], list[bool], list[bool], list[int]]:
    """Per packed slot: (accumulates, is an age, is an OR flag, row slot that says "replace").

    The replace source indexes the row, whose last two slots are the constants 0 and 1.
    """
    size = packed_size(num_layers)
    never, always = size, size + 1
    accumulates, age, flag = [False] * size, [False] * size, [False] * size
    replace = [never] * size
    for k in range(NUM_KINDS):
        accumulates[S_COUNT + k] = accumulates[S_AGE + k] = age[S_AGE + k] = True
        replace[S_NOW + k] = always
        replace[S_THRESHOLD + k] = S_NOW + k
    accumulates[S_AMP_COUNT] = True
    replace[S_AMP_NOW] = always
    for offset, owner in enumerate(_DETAIL_OWNERS):
        replace[S_TOTAL + offset] = S_NOW + owner
    block = LAYER_KINDS * num_layers
    any_start, now_start, values_start = NUM_SCALARS, NUM_SCALARS + block, NUM_SCALARS + 2 * block
    for i in range(block):
        accumulates[any_start + i] = flag[any_start + i] = True
        replace[now_start + i] = always
        replace[values_start + i] = now_start + i  # a layer's value: where it is involved
    return accumulates, age, flag, replace


class PendingFindings:
    """Flags, counts, values and thresholds of the steps since the last read.

    Args:
        num_layers: the number of layers.
        dtype: the float dtype of the values (the norms').
        device: where everything lives.

    Example:
        >>> pending = PendingFindings(2, torch.float32, torch.device("cpu"))
        >>> false, true, zero = torch.tensor(False), torch.tensor(True), torch.tensor(0.0)
        >>> pending.add((true, false, false, false), (zero,) * 4, None, (zero,) * 5,
        ...             (torch.tensor([True, False]), torch.tensor([False, False]),
        ...              torch.tensor([False, False])),
        ...             torch.tensor([float("nan"), 1.0]))
        >>> pending.pack()[:4].tolist(), pending.pack()[-6:].tolist()
        ([1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        accumulates, age, flag, replace = _slot_rules(num_layers)
        self.packed = torch.zeros(packed_size(num_layers), dtype=dtype, device=device)
        self._accumulates = torch.tensor(accumulates, device=device)
        self._age = torch.tensor(age, device=device)
        self._cap = torch.tensor([1.0 if f else math.inf for f in flag], dtype=dtype, device=device)
        self._replace_from = torch.tensor(replace, device=device)
        self._constants = torch.tensor([0.0, 1.0], dtype=dtype, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)

    @property
    def now(self) -> Tensor:
        """``[NUM_KINDS]`` float flags of the latest step (a view of the packed tensor)."""
        return self.packed[S_NOW : S_NOW + NUM_KINDS]

    def add(
        self,
        flags: Sequence[Tensor],
        thresholds: Sequence[Tensor],
        amp: Tensor | None,
        details: Sequence[Tensor],
        layers: Sequence[Tensor],
        norms: Tensor,
    ) -> None:
        """Take in one step.

        Args:
            flags: ``NUM_KINDS`` scalar bools: which rule fired.
            thresholds: ``NUM_KINDS`` scalars: each rule's threshold this step.
            amp: scalar bool, the GradScaler found an overflow (``None``: no scaler).
            details: 5 scalars: total norm, spike rule, ratio rule, loss, loss-spike rule.
            layers: ``LAYER_KINDS`` ``[L]`` bools: the layers each layer rule names.
            norms: ``[L]`` layer norms (NaN allowed).
        """
        amp = self._false if amp is None else amp
        scalars = torch.stack([*flags, *flags, *flags, *thresholds, amp, amp, *details])
        involved = torch.stack(list(layers)).view(-1)
        encoded = torch.nan_to_num(norms, nan=NAN_CODE, posinf=math.inf, neginf=-math.inf)
        row = torch.cat(
            [scalars, involved, involved, encoded, encoded, encoded, self._constants]
        ).to(self.dtype)
        this = row[: self.packed.numel()]
        acc = self.packed
        # counts add the flag; an age grows once started, else starts at the flag
        step_in = torch.maximum(this, (acc > 0) & self._age)
        kept = torch.minimum(torch.where(self._accumulates, acc + step_in, acc), self._cap)
        replace = row.index_select(0, self._replace_from) > 0.5
        self.packed = torch.where(replace, this, kept)

    def pack(self) -> Tensor:
        """Everything in the packed layout of :mod:`~grad_guard.core.detect.findings`."""
        return self.packed

    def clear(self) -> None:
        """Forget everything (after a read)."""
        self.packed = torch.zeros_like(self.packed)  # not in place: made under inference_mode
