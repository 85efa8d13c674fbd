"""What the rules found since the last read, accumulated on the device in few ops a step.

Each part is its own small tensor, updated out of place (no slicing of one packed
vector); :meth:`PendingFindings.pack` lays them out as
:mod:`grad_guard.core.detect.findings` describes, only when the host reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grad_guard.core.detect.findings import LAYER_KINDS, NAN_CODE, NUM_KINDS

# details slots (S_TOTAL, S_SPIKE_RULE, S_RATIO_RULE, S_LOSS, S_LOSS_RULE) follow the
# flag of: exploding, exploding, vanishing, loss_spike, loss_spike
_DETAIL_OWNERS = (1, 1, 2, 3, 3)


class PendingFindings:
    """Flags, counts, values and thresholds of the steps since the last read.

    Args:
        num_layers: the number of layers.
        dtype: the float dtype of the values (the norms').
        device: where everything lives.

    Example:
        >>> pending = PendingFindings(2, torch.float32, torch.device("cpu"))
        >>> now = torch.tensor([True, False, False, False])
        >>> pending.add(now, torch.zeros(4), None, torch.zeros(5),
        ...             torch.tensor([[True, False], [False, False], [False, False]]),
        ...             torch.tensor([float("nan"), 1.0]))
        >>> pending.pack()[:4].tolist(), pending.pack()[-6:].tolist()
        ([1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, num_layers: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.count, self.age, self.now, self.threshold = (zeros(NUM_KINDS) for _ in range(4))
        self.amp = zeros(2)  # count, now
        self.details = zeros(len(_DETAIL_OWNERS))
        self.layers_any = torch.zeros(LAYER_KINDS, num_layers, dtype=torch.bool, device=device)
        self.layers_now = torch.zeros_like(self.layers_any)
        self.values = zeros(LAYER_KINDS, num_layers)
        self._owners = torch.tensor(_DETAIL_OWNERS, device=device)
        self._keep_count = torch.tensor([1.0, 0.0], dtype=dtype, device=device)
        self._amp_now = False  # whether amp[1] may be nonzero

    def add(
        self,
        now: Tensor,
        thresholds: Tensor,
        amp: Tensor | None,
        details: Tensor,
        layers_now: Tensor,
        norms: Tensor,
    ) -> None:
        """Take in one step: ``now`` [NUM_KINDS] bool, ``thresholds`` [NUM_KINDS],
        ``amp`` scalar bool (or ``None``), ``details`` [5], ``layers_now``
        [LAYER_KINDS, L] bool, ``norms`` [L]."""
        now_f = now.to(self.dtype)
        self.count = self.count + now_f
        self.age = torch.where(self.age > 0, self.age + 1, now_f)
        self.now = now_f
        self.threshold = torch.where(now, thresholds, self.threshold)
        if amp is not None:
            amp_f = amp.to(self.dtype)
            self.amp = torch.stack([self.amp[0] + amp_f, amp_f])
            self._amp_now = True
        elif self._amp_now:  # no scaler this step: "now" goes back to 0, the count stays
            self.amp = self.amp * self._keep_count
            self._amp_now = False
        owners = now.index_select(0, self._owners)
        if details.dtype != self.dtype:
            details = details.to(self.dtype)
        self.details = torch.where(owners, details, self.details)
        self.layers_any = self.layers_any | layers_now
        self.layers_now = layers_now
        encoded = torch.where(torch.isnan(norms), NAN_CODE, norms)
        self.values = torch.where(layers_now, encoded, self.values)

    def pack(self) -> Tensor:
        """Everything in the packed layout of :mod:`~grad_guard.core.detect.findings`."""
        return torch.cat(
            [
                self.count,
                self.age,
                self.now,
                self.threshold,
                self.amp,
                self.details,
                self.layers_any.flatten().to(self.dtype),
                self.layers_now.flatten().to(self.dtype),
                self.values.flatten(),
            ]
        )

    def clear(self) -> None:
        """Forget everything (after a read)."""
        for tensor in (self.count, self.age, self.now, self.threshold, self.amp, self.details):
            tensor.zero_()
        self.layers_any.zero_()
        self.layers_now.zero_()
        self.values.zero_()
