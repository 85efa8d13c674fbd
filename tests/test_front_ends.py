"""The plain-loop and the Lightning front ends run one engine: same events, counts, grads."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch

from grad_guard import GradGuard, GradientAnomalyDetection, GradientGuard, NormClip
from grad_guard.core.detect import DetectionConfig
from grad_guard.core.events import GradientAnomalyWarning

from helpers import TinyModule, make_loader, trainer

NAN_STEPS = (3, 11)
SPIKE_STEP = 7  # a x1e4 loss: over max_total_norm, skipped as exploding
STEPS = 16


class Faulty(TinyModule):
    """The same gradient sequence whichever loop drives it."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if batch_idx in NAN_STEPS:
            return loss * float("nan")
        if batch_idx == SPIKE_STEP:
            return loss * 1e4
        return loss


def _settings() -> dict[str, Any]:
    return dict(on_nonfinite="skip", on_exploding="skip", max_consecutive_skips=5)


def _lightning(tmp_path: Any, model: Faulty) -> tuple[Any, list[torch.Tensor]]:
    detection = GradientAnomalyDetection(max_total_norm=50.0, spike_z_threshold=None, **_settings())
    guard = GradGuard(detection=detection, clipping=NormClip(0.5), report=False)
    fit = trainer(tmp_path, max_steps=STEPS, log_every_n_steps=4, callbacks=[guard], logger=False)
    fit.fit(model, make_loader(n=8 * STEPS))
    return detection, [p.detach().clone() for p in model.parameters()]


def _plain_loop(model: Faulty) -> tuple[Any, list[torch.Tensor]]:
    optimizer = model.configure_optimizers()
    guard = GradientGuard(
        model,
        optimizer,
        clipping=NormClip(0.5),
        detection=DetectionConfig(max_total_norm=50.0, spike_z_threshold=None),
        log_every_n_steps=4,
        **_settings(),
    )
    for step, batch in enumerate(make_loader(n=8 * STEPS)):
        optimizer.zero_grad()
        loss = model.training_step(batch, step)
        loss.backward()
        if guard.step(step, loss=loss).should_step:
            optimizer.step()
    guard.flush()
    return guard, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("front_end", ["lightning", "plain_loop"])
def test_both_front_ends_match_one_reference(tmp_path, front_end):
    torch.manual_seed(0)
    template = Faulty(lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientAnomalyWarning)
        lightning, lightning_weights = _lightning(tmp_path, copy.deepcopy(template))
        plain, plain_weights = _plain_loop(copy.deepcopy(template))
    ran, other = (lightning, plain) if front_end == "lightning" else (plain, lightning)
    expected = {"nonfinite": 2, "exploding": 1, "loss_spike": 2, "skipped_steps": 3}
    for key, value in expected.items():
        assert ran.counts[key] == value, (front_end, key, ran.counts)
    assert ran.counts == other.counts
    summary = [(e.step, e.kind, e.layers, e.action) for e in ran.events]
    assert summary == [(e.step, e.kind, e.layers, e.action) for e in other.events]
    assert [(s, k) for s, k, *_ in summary if k != "loss_spike"] == [
        (3, "nonfinite"),
        (7, "exploding"),
        (11, "nonfinite"),
    ]
    # skipped and clipped alike: the weights are the same to float precision
    for a, b in zip(lightning_weights, plain_weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.isfinite(a).all()
