"""Fused optimizers: clipping and skipping folded into the kernel, and its host syncs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from grad_guard import GradGuard, GradientGuard, GradientNormMonitor, NormClip
from grad_guard.callbacks.clipping import GradientClipping
from grad_guard.core.events import GradientAnomalyWarning

from helpers import TinyModule, make_loader, read_scalars, trainer
from sync_counter import count_host_syncs


class FusedModule(TinyModule):
    def __init__(self, fused: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fused = fused

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def _backward(model: nn.Module, scale: float = 1.0) -> None:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    (model(x).pow(2).mean() * scale).backward()


def test_a_skipped_step_leaves_fused_adamw_bit_identical():
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = GradientGuard(model, optimizer, clipping=NormClip(1.0))
    for step in range(3):  # some state to keep
        optimizer.zero_grad()
        _backward(model)
        assert guard.step(step).folded
        optimizer.step()
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    optimizer.zero_grad()
    _backward(model)
    model[0].weight.grad[0, 0] = float("nan")
    result = guard.step(3)
    assert result.should_step  # the kernel drops it: call step() as usual
    optimizer.step()
    for before, after in zip(weights, model.parameters()):
        assert torch.equal(before, after.detach())
    for index, saved in state.items():
        now = optimizer.state_dict()["state"][index]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[key], now[key]), key
    assert guard.counts["skipped_steps"] == 0  # nothing read on the host yet (no sync)
    with pytest.warns(GradientAnomalyWarning, match="non-finite"):
        guard.flush()  # the lazy read: counted and warned now
    assert guard.counts["skipped_steps"] == 1 and guard.counts["nonfinite"] == 1
    # the attributes the fold set are gone: a later plain step works and moves the weights
    optimizer.zero_grad()
    _backward(model)
    guard.step(4)
    optimizer.step()
    assert not hasattr(optimizer, "found_inf") and not hasattr(optimizer, "grad_scale")
    assert not torch.equal(weights[0], model[0].weight.detach())


@pytest.mark.parametrize("clipping", [NormClip(0.05), "autoclip", "zscore"])
def test_in_kernel_clipping_equals_clip_then_step(clipping):
    folded, multiplied = _mlp(), _mlp()
    opt_a = torch.optim.AdamW(folded.parameters(), lr=0.05, fused=True)
    opt_b = torch.optim.AdamW(multiplied.parameters(), lr=0.05, fused=True)
    guard_a = GradientGuard(folded, opt_a, clipping=copy.deepcopy(clipping))
    guard_b = GradientGuard(
        multiplied, opt_b, clipping=copy.deepcopy(clipping), fold_into_optimizer=False
    )
    for step in range(40):
        for model, optimizer, guard in ((folded, opt_a, guard_a), (multiplied, opt_b, guard_b)):
            optimizer.zero_grad()
            _backward(model, scale=50.0 if step in (30, 35) else 1.0)  # spikes for ZClip
            result = guard.step(step)
            assert result.folded is (guard is guard_a)
            optimizer.step()
    for a, b in zip(folded.parameters(), multiplied.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert guard_a.clipping.clipped_steps.item() == guard_b.clipping.clipped_steps.item() > 0


def test_gradguard_defaults_with_fused_adamw_make_no_host_sync_between_logging_steps(tmp_path):
    fit = trainer(tmp_path, max_steps=12, log_every_n_steps=5, callbacks=[GradGuard(report=False)])
    with count_host_syncs(lambda: fit.fit_loop.epoch_loop._batches_that_stepped) as counts:
        fit.fit(FusedModule(lr=0.01), make_loader(n=96))
    logging = {0, 5, 10}
    assert all(counts[step] == 1 for step in logging), counts  # one packed copy
    between = {step: n for step, n in counts.items() if step not in logging and step < 12}
    assert between == {}, between


def test_skip_armed_non_fused_reads_once_and_monitor_clipping_never(tmp_path):
    fit = trainer(tmp_path, max_steps=12, log_every_n_steps=5, callbacks=[GradGuard(report=False)])
    with count_host_syncs(lambda: fit.fit_loop.epoch_loop._batches_that_stepped) as counts:
        fit.fit(FusedModule(fused=False, lr=0.01), make_loader(n=96))
    assert all(counts[step] == 1 for step in range(12)), counts
    quiet = [GradientNormMonitor(log_update_ratio=False), GradientClipping("zscore")]
    fit = trainer(tmp_path / "quiet", max_steps=12, log_every_n_steps=5, callbacks=quiet)
    with count_host_syncs(lambda: fit.fit_loop.epoch_loop._batches_that_stepped) as counts:
        fit.fit(TinyModule(), make_loader(n=96))
    assert {step for step in counts if step % 5} == set(), counts
    assert all(counts[step] == 1 for step in (0, 5, 10)), counts


def test_grad_scaler_with_fused_adamw_unscales_and_clips_once(tmp_path):
    max_norm = 0.05
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    torch.manual_seed(0)
    module = FusedModule(lr=0.01)
    reference = copy.deepcopy(module)
    guard = GradGuard(clipping=NormClip(max_norm), detection=False, report=False)
    fit = trainer(
        tmp_path,
        max_steps=4,
        callbacks=[guard],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    fit.fit(module, make_loader())
    scalars = read_scalars(fit.logger.log_dir)

    # by hand: scale, backward, unscale, clip, step (what Lightning does for non-fused)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = reference.configure_optimizers()
    norms = []
    for batch_idx, batch in zip(range(4), make_loader()):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = reference.training_step(batch, batch_idx)
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(optimizer)
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm).item())
        ref_scaler.step(optimizer)
        ref_scaler.update()
    for step, norm in enumerate(norms):  # logged norms are unscaled, pre-clip
        assert scalars["grad_guard/clip/pre_norm"][step] == pytest.approx(norm, rel=1e-4)
        assert scalars["grad_guard/clip/post_norm"][step] == pytest.approx(max_norm, rel=1e-3)
    for a, b in zip(module.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
