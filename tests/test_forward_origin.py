"""ForwardOriginTracer: the module or parameter where a NaN was born."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from grad_guard.core.forward_origin import INPUT_ORIGIN, ForwardOriginTracer


class LogAtStep(nn.Module):
    """Returns ``log(x)``; on step ``k`` (set by the loop) its input is negative: NaN."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.step = k, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.abs() + 1.0
        return torch.log(-x if self.step == self.k else x)


class Block(nn.Module):
    def __init__(self, k: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = LogAtStep(k) if k is not None else nn.Tanh()
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


class Net(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(k), Block()])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _train(model: Net, steps: int, on_nonfinite) -> list[bool]:
    """A loop that calls ``on_nonfinite(batch)`` after each step whose output was not finite."""
    finite = []
    torch.manual_seed(0)
    for step in range(steps):
        model.blocks[1].act.step = step
        batch = torch.randn(4, 8)
        out = model(batch)
        finite.append(bool(torch.isfinite(out).all()))
        if not finite[-1]:
            on_nonfinite(batch)
    return finite


def test_replaying_the_bad_step_names_the_module_that_took_log_of_a_negative_input():
    model = Net(k=3)
    tracer = ForwardOriginTracer(model)
    origins = []
    finite = _train(model, 6, lambda batch: origins.append(tracer.replay(model, batch)))
    assert finite == [True, True, True, False, True, True]
    assert origins == ["blocks.1.act"]
    assert tracer.hook_count == 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_arming_for_the_next_step_names_the_module_when_the_fault_persists():
    class FromK(LogAtStep):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.abs() + 1.0
            return torch.log(-x if self.step >= self.k else x)

    model = Net(k=99)
    model.blocks[1].act = FromK(2)
    tracer = ForwardOriginTracer(model)
    hooks_per_step = []

    def arm(batch: torch.Tensor) -> None:
        if not tracer.armed:
            tracer.arm()

    finite = []
    for step in range(5):
        model.blocks[1].act.step = step
        hooks_per_step.append(tracer.hook_count)
        finite.append(bool(torch.isfinite(model(torch.randn(4, 8))).all()))
        if tracer.armed and not finite[-1]:
            tracer.disarm()
            break
        if not finite[-1]:
            arm(None)
    assert finite == [True, True, False, False]
    assert hooks_per_step[:3] == [0, 0, 0] and hooks_per_step[3] > 0
    assert tracer.origin == "blocks.1.act"


def test_a_transient_fault_is_missed_by_the_next_step_but_not_by_replay():
    model = Net(k=1)
    tracer = ForwardOriginTracer(model)
    model.blocks[1].act.step = 1
    tracer.arm()
    model.blocks[1].act.step = 2  # the next batch is healthy again
    model(torch.randn(4, 8))
    tracer.disarm()
    assert tracer.origin is None
    model.blocks[1].act.step = 1
    assert tracer.replay(model, torch.randn(4, 8)) == "blocks.1.act"


def test_a_finite_forward_has_no_origin():
    model = Net(k=99)
    tracer = ForwardOriginTracer(model)
    tracer.arm()
    model(torch.randn(4, 8))
    tracer.disarm()
    assert tracer.origin is None


def test_a_nan_parameter_is_named_before_any_module():
    torch.manual_seed(0)
    model = Net(k=99)
    with torch.no_grad():
        model.blocks[2].out.weight[0, 1] = float("nan")
    tracer = ForwardOriginTracer(model)
    assert tracer.parameter_origin() == "parameter blocks.2.out.weight"
    assert tracer.replay(model, torch.randn(2, 8)) == "parameter blocks.2.out.weight"


def test_a_nan_buffer_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    model[1].running_var.fill_(float("inf"))
    assert ForwardOriginTracer(model).parameter_origin() == "buffer 1.running_var"


def test_a_nan_in_the_batch_is_reported_as_the_input():
    model = Net(k=99)
    tracer = ForwardOriginTracer(model)
    batch = torch.randn(4, 8)
    batch[2, 3] = float("nan")
    assert tracer.replay(model, batch) == INPUT_ORIGIN


def test_a_nan_made_between_submodules_names_the_enclosing_module():
    class Between(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) / 0.0)  # no module owns the division

    model = nn.Sequential(nn.Linear(4, 4), Between(), nn.Linear(4, 1))
    assert ForwardOriginTracer(model).replay(model, torch.randn(3, 4)) == "1"


def test_replay_leaves_batchnorm_statistics_and_the_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    before = model[1].running_mean.clone()
    batch = torch.randn(8, 4)
    state = torch.get_rng_state()
    assert ForwardOriginTracer(model).replay(model, batch) is None
    assert torch.equal(model[1].running_mean, before)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_in_backward_is_not_traced(reentrant):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tracer = ForwardOriginTracer(inner)
    tracer.arm()
    x = torch.randn(2, 4, requires_grad=True)
    checkpoint(inner, x, use_reentrant=reentrant).sum().backward()
    forward_calls = len(tracer._done)
    tracer.disarm()
    assert forward_calls == 4  # the Sequential and its three children, once each
    assert tracer.origin is None


def test_wrapper_components_are_left_out_of_names():
    model = nn.Module()
    model._checkpoint_wrapped_module = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        model._checkpoint_wrapped_module[0].bias.fill_(float("nan"))
    assert ForwardOriginTracer(model).parameter_origin() == "parameter 0.bias"


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got int"):
        ForwardOriginTracer(3)
