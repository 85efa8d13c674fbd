"""The "rollback" action: restore the last healthy state, skip the bad batch, keep going."""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from grad_guard import GradGuard, GradientAnomalyDetection, GradientGuard
from grad_guard.core.detect import DetectionConfig
from grad_guard.core.events import GradientAnomalyWarning
from grad_guard.core.rollback import RollbackConfig

from helpers import TinyModule, make_loader, trainer

BAD_BATCH = 5


class BadBatch(TinyModule):
    """Batch BAD_BATCH of every epoch gives a NaN loss."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == BAD_BATCH else loss


def _detection(**kwargs: Any) -> GradientAnomalyDetection:
    return GradientAnomalyDetection(
        on_nonfinite="rollback", snapshot_every_n_steps=2, spike_z_threshold=None, **kwargs
    )


def _fit(root: Any, module: Any, detection: Any, epochs: int, ckpt: str | None = None) -> Any:
    fit = trainer(
        root,
        max_steps=-1,
        max_epochs=epochs,
        callbacks=[GradGuard(detection=detection, clipping=None, report=False)],
        logger=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientAnomalyWarning)
        fit.fit(module, make_loader(n=80), ckpt_path=ckpt)  # 10 batches an epoch
    return fit


def test_a_bad_batch_is_rolled_back_once_then_skipped_also_after_resume(tmp_path):
    torch.manual_seed(0)
    template = BadBatch(lr=0.1)
    detection = _detection()
    module = copy.deepcopy(template)
    fit = _fit(tmp_path / "a", module, detection, epochs=3)
    assert detection.counts["rollbacks"] == 1  # the first time only
    assert detection.counts["skipped_steps"] == 3  # once per epoch
    assert detection.counts["nonfinite"] == 1  # later epochs never run the rules on it
    (event,) = [e for e in detection.events if e.kind == "nonfinite"]
    assert event.step == BAD_BATCH and event.action == "rollback" and event.restored_step == 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert fit.global_step == 30

    # resume from a checkpoint taken after the rollback: the bad batch stays skipped
    resumed_detection = _detection()
    first = copy.deepcopy(template)
    fit = _fit(tmp_path / "b", first, resumed_detection, epochs=1)
    path = os.path.join(str(tmp_path), "after_rollback.ckpt")
    fit.save_checkpoint(path)
    second = copy.deepcopy(template)
    again = _detection()
    _fit(tmp_path / "b", second, again, epochs=3, ckpt=path)
    assert again.counts["rollbacks"] == 1 and again.counts["skipped_steps"] == 3
    for a, b in zip(module.parameters(), second.parameters()):  # resumed == uninterrupted
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_nan_parameter_is_named_and_rolled_back(tmp_path):
    class Poison(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 6:
                with torch.no_grad():
                    self.net[2].weight[0, 0] = float("nan")
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    detection = _detection()
    module = Poison(lr=0.1)
    _fit(tmp_path, module, detection, epochs=1)
    (event,) = [e for e in detection.events if e.kind == "nonfinite"]
    assert event.forward_origin == "parameter net.2.weight"
    assert "parameter `net.2.weight` is non-finite" in event.message()
    assert event.action == "rollback" and detection.counts["rollbacks"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_without_rollback_a_nan_parameter_stops_the_run_naming_it(tmp_path):
    class Poison(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 3:
                with torch.no_grad():
                    self.net[0].bias[0] = float("inf")
            return super().training_step(batch, batch_idx)

    detection = GradientAnomalyDetection(on_nonfinite="skip")
    fit = trainer(tmp_path, max_steps=10, callbacks=[detection], logger=False)
    with pytest.warns(GradientAnomalyWarning) as warned:
        fit.fit(Poison(), make_loader())
    messages = " ".join(str(w.message) for w in warned)
    assert "parameter `net.0.bias` is non-finite" in messages
    assert "loss spike at step 3" in messages  # the inf weight makes the loss inf too
    assert fit.global_step == 4  # stopped right away, not after max_consecutive_skips


def test_plain_loop_rolls_back_model_and_optimizer_and_cools_down():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    guard = GradientGuard(
        model,
        optimizer,
        clipping=None,
        detection=DetectionConfig(spike_z_threshold=None),
        on_nonfinite="rollback",
        rollback=RollbackConfig(snapshot_every_n_steps=4, min_healthy_steps=2, lr_factor=0.5, cooldown_steps=2),
    )
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    snapshots = {}
    lrs = []
    for step in range(12):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean() * (float("nan") if step == 9 else 1.0)
        loss.backward()
        if step == 9:  # the NaN step: the gradient rule rolls back, the loss rule warns
            with pytest.warns(GradientAnomalyWarning) as warned:
                result = guard.step(step, loss=loss, batch_index=step)
            messages = " ".join(str(w.message) for w in warned)
            assert "Action: rollback" in messages and "loss spike at step 9" in messages
        else:
            result = guard.step(step, loss=loss, batch_index=step)
        lrs.append(optimizer.param_groups[0]["lr"])
        if step == 8:  # the snapshot of step 8: the state the step started from
            snapshots["at_8"] = [p.detach().clone() for p in model.parameters()]
        if result.should_step:
            optimizer.step()
        guard._engine.after_step(0)
        if step == 9:
            assert result.restored_step == 8 and not result.should_step
            for a, b in zip(snapshots["at_8"], model.parameters()):
                assert torch.equal(a, b.detach())
    assert guard.counts["rollbacks"] == 1
    assert lrs[9:12] == [0.01, 0.005, 0.005]  # two steps of cool-down after the rollback
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_born_in_the_forward_pass_names_its_module(tmp_path):
    class NegativeLog(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.active = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x - 10.0) * self.scale if self.active else x * self.scale

    class Model(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = NegativeLog()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.head.active = batch_idx >= 4  # from step 4 on, log of a negative input
            return super().training_step(batch, batch_idx)

    detection = GradientAnomalyDetection(on_nonfinite="skip", max_consecutive_skips=100)
    fit = trainer(tmp_path, max_steps=7, callbacks=[detection], logger=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientAnomalyWarning)
        fit.fit(Model(), make_loader())
    first = next(e for e in detection.events if e.kind == "nonfinite")
    assert first.step == 4 and first.forward_origin == "head", first


def test_a_loss_spike_for_one_step_is_an_event_at_that_step(tmp_path):
    class Spiky(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * 1000.0 if batch_idx == 12 else loss

    detection = GradientAnomalyDetection(
        on_loss_spike="skip", loss_warmup_steps=5, loss_window=10, spike_z_threshold=None
    )
    fit = trainer(tmp_path, max_steps=16, callbacks=[detection], logger=False)
    with pytest.warns(GradientAnomalyWarning, match="loss spike at step 12"):
        fit.fit(Spiky(lr=0.01), make_loader(n=128))
    spikes = [e for e in detection.events if e.kind == "loss_spike"]
    assert [(e.step, e.rule, e.action) for e in spikes] == [(12, "loss_spike", "skip")]
    assert spikes[0].loss > spikes[0].threshold
    assert detection.counts["loss_spike"] == 1 and detection.counts["skipped_steps"] == 1


@pytest.mark.slow
def test_a_nan_written_into_a_parameter_is_repaired_on_digits(tmp_path):
    import lightning as L

    from grad_guard.demo.data import digits_dataset, digits_loader
    from grad_guard.models import DeepMLP, ImageClassifier

    class Poisoner(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 40:
                with torch.no_grad():
                    next(pl_module.parameters()).view(-1)[0] = float("nan")

    def run(poison: bool) -> tuple[float, Any]:
        torch.manual_seed(0)
        model = DeepMLP(64, 10, depth=4, width=64, activation="relu", init="he")
        module = ImageClassifier(model, lr=0.05, momentum=0.9)
        detection = GradientAnomalyDetection(on_nonfinite="rollback", snapshot_every_n_steps=10)
        callbacks = [GradGuard(detection=detection, clipping=None, report=False)]
        fit = trainer(
            tmp_path / str(poison),
            max_steps=-1,
            max_epochs=3,
            logger=False,
            callbacks=callbacks + ([Poisoner()] if poison else []),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradientAnomalyWarning)
            fit.fit(module, digits_loader(batch_size=64, seed=0))
        data = digits_dataset()
        with torch.no_grad():
            accuracy = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return accuracy.item(), detection

    clean, _ = run(poison=False)
    repaired, detection = run(poison=True)
    assert detection.counts["rollbacks"] == 1
    (event,) = [e for e in detection.events if e.kind == "nonfinite"]
    assert event.forward_origin == "parameter model.fc1.weight"
    assert event.restored_step == 30  # the last snapshot (every 10 steps) before step 40
    assert clean > 0.9
    assert abs(repaired - clean) <= 0.01, (clean, repaired)
