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


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_a_gradient_with_a_graph_is_clipped_without_recording_the_multiply() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    model(torch.randn(4, 8)).square().sum().backward(create_graph=True)  # grads require grad
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradientGuard(model, optimizer, clipping=NormClip(1e-3), on_nonfinite="skip")
    guard.step(1)
    total = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)


def test_a_failed_read_leaves_the_gradients_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import grad_guard.core.engine as engine_module

    def broken_read(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the read broke")

    model = _model_with_grads(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradientGuard(model, optimizer, clipping=NormClip(1e-3), on_nonfinite="skip")
    monkeypatch.setattr(engine_module, "read_step", broken_read)
    with pytest.raises(RuntimeError, match="the read broke"):
        guard.step(1)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adamw"])
def test_a_clipper_failure_still_drops_a_nan_step(fused: bool) -> None:
    class Broken(NormClip):
        def _clip(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("the clipper broke")

    model = _model_with_grads(1.0)
    weights = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad[0, 0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    guard = GradientGuard(model, optimizer, clipping=Broken(1.0), on_nonfinite="skip")
    with pytest.warns(UserWarning) as warned:
        result = guard.step(1)
        optimizer.step()  # fused: the kernel drops the step itself (call it whatever)
        guard.flush()
    messages = " ".join(str(w.message) for w in warned)
    assert "the clipper broke" in messages and "non-finite" in messages
    assert result.should_step is fused  # fused: "step anyway", the kernel skips
    assert guard.counts["skipped_steps"] == 1
    for got, want in zip(model.parameters(), weights):
        assert torch.equal(got.detach(), want)
