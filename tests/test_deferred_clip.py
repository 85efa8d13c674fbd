"""The clip factor of a step that is read on the host anyway rides in that read.

With a non-fused optimizer and an action armed that needs the host (``"skip"``), or on a
logging step, the engine reads the step's flags anyway; the clip factor comes along and a
factor of exactly 1 (an unclipped step) is not multiplied in. Without such a read the
factor is always multiplied in, as ``clip_grad_norm_`` does, with no host sync.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grad_guard import GradientGuard, NormClip
from grad_guard.core.events import GradientAnomalyWarning

from sync_counter import count_host_syncs


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _model_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    model(torch.randn(4, 8)).square().sum().mul(scale).backward()
    return model


def _step(model: nn.Module, max_norm: float, on_nonfinite: str) -> tuple[Counter[str], int]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradientGuard(
        model, optimizer, clipping=NormClip(max_norm), on_nonfinite=on_nonfinite  # type: ignore[arg-type]
    )
    with count_host_syncs(lambda: 0) as syncs, _CountOps() as counter:
        guard.step(1)  # not a logging step (every 50, from 0)
    return counter.ops, sum(syncs.values())


@pytest.mark.parametrize("max_norm", [1e-3, 1e6], ids=["clipped", "unclipped"])
def test_read_step_multiplies_only_a_factor_below_one(max_norm: float) -> None:
    model = _model_with_grads(1.0)
    expected = _model_with_grads(1.0)
    torch.nn.utils.clip_grad_norm_(expected.parameters(), max_norm)
    ops, syncs = _step(model, max_norm, on_nonfinite="skip")
    assert syncs == 1  # the one tiny read that skip needs
    assert ops["_foreach_mul_"] == (1 if max_norm < 1 else 0)
    for got, want in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=0)


def test_without_a_read_the_factor_is_always_multiplied_in() -> None:
    model = _model_with_grads(1.0)
    before = [p.grad.clone() for p in model.parameters()]
    ops, syncs = _step(model, 1e6, on_nonfinite="warn")
    assert syncs == 0
    assert ops["_foreach_mul_"] == 1
    for got, want in zip(model.parameters(), before):
        assert torch.equal(got.grad, want)  # times exactly 1.0


def test_a_skipped_step_is_not_multiplied() -> None:
    model = _model_with_grads(1.0)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(GradientAnomalyWarning, match="non-finite"):
        ops, _ = _step(model, 1e-3, on_nonfinite="skip")
    assert all(p.grad is None for p in model.parameters())
    assert ops["_foreach_mul_"] == 0
