"""The engine's device part runs under ``torch.inference_mode()`` (plain tensors).

An inference tensor cannot be modified in place outside inference mode, so none may reach
what is modified in place later: the optimizer's state, the weights a rollback restores,
a clipper used on its own, a resumed guard.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from grad_guard import GradientGuard
from grad_guard.core.clip import AGC, AutoClip, NormClip, ZClip
from grad_guard.core.events import GradientAnomalyWarning
from grad_guard.core.rollback import RollbackConfig

BAD_STEP = 7


def _train(guard: GradientGuard, model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    generator = torch.Generator().manual_seed(0)
    result = None
    for step in steps:
        x = torch.randn(16, 4, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        (loss * float("nan") if step == BAD_STEP else loss).backward()
        result = guard.step(step, loss=loss.detach(), batch_index=step)
        if result.should_step or result.should_step is None:
            optimizer.step()
    assert result is not None and result.stats is not None  # what the loop hands back
    handed = [result.pre_clip_norm, result.post_clip_norm, result.clip_threshold]
    handed += [result.stats.layer_norms, result.stats.total_norm, result.stats.nonfinite]
    assert not [t for t in handed if t is not None and t.is_inference()]


def _inference_tensors(obj: object) -> list[str]:
    found: list[str] = []

    def visit(value: object, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_inference():
                found.append(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]")

    visit(obj, "")
    return found


@pytest.mark.parametrize("fused", [False, True], ids=["sgd_momentum", "fused_adamw"])
@pytest.mark.parametrize(
    "make_clipping",
    [lambda: ZClip(warmup_steps=3), AutoClip, lambda: NormClip(0.5), AGC],
    ids=["zclip", "autoclip", "normclip", "agc"],
)
def test_nothing_made_under_inference_mode_is_later_modified_in_place(make_clipping, fused) -> None:
    clipping = make_clipping()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    if fused:
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    rollback = RollbackConfig(snapshot_every_n_steps=2, min_healthy_steps=1)
    guard = GradientGuard(
        model, optimizer, clipping=clipping, log_every_n_steps=3,
        on_nonfinite="rollback", rollback=rollback,
    )
    with pytest.warns(GradientAnomalyWarning, match="non-finite"):
        _train(guard, model, optimizer, range(12))
    guard.flush()
    assert guard.counts["rollbacks"] == 1
    assert not _inference_tensors(optimizer.state_dict()), "optimizer state"
    assert not [n for n, p in model.named_parameters() if p.is_inference()]

    # the clipper on its own, after the engine used it, and its state in a new guard
    clipping(list(model.parameters()))
    state = guard.state_dict()
    assert not _inference_tensors(state), "the guard's state_dict"
    again = GradientGuard(model, optimizer, clipping=make_clipping(), log_every_n_steps=3)
    again.load_state_dict(state)
    _train(again, model, optimizer, range(12, 16))
    again.flush()
    assert not _inference_tensors(optimizer.state_dict())
