"""GradientAnomalyDetection in real Trainer.fit runs on CPU."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from grad_guard import GradientAnomalyDetection, GradientAnomalyError
from grad_guard.callbacks.session import EVENTS_TEXT_TAG
from grad_guard.core.events import GradientAnomalyWarning

from helpers import TinyModule, event_accumulator, make_loader, read_scalars, trainer
from sync_counter import count_host_syncs

NAN_STEP = 3


class NaNModule(TinyModule):
    """TinyModule whose layer ``net.2`` gets a NaN gradient at chosen steps."""

    def __init__(self, nan_steps: tuple[int, ...] = (NAN_STEP,), layer: str = "net.2", **kwargs):
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)
        self.layer = layer

    def on_after_backward(self) -> None:
        if self.global_step in self.nan_steps:
            self.get_submodule(self.layer).weight.grad[0, 0] = math.nan

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # momentum and weight decay: a zeroed gradient would still move the weights
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=0.01)


class WeightProbe(Callback):
    """Snapshots the weights around every batch, and what the shared step context says."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.skipped: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step] = _weights(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # runs after the detection callback: a skipped step has no gradients left
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.skipped[trainer.global_step] = all(p.grad is None for p in params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = _weights(pl_module)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _fit(tmp_path, module, callbacks, **kwargs) -> L.Trainer:
    fit_trainer = trainer(tmp_path, callbacks=callbacks, **kwargs)
    fit_trainer.fit(module, make_loader(n=kwargs.pop("n", 80)))
    return fit_trainer


def test_nan_with_skip_leaves_weights_bit_identical_and_training_continues(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip")
    probe = WeightProbe()
    with pytest.warns(GradientAnomalyWarning, match="'net.2'"):
        fit_trainer = _fit(tmp_path, NaNModule(), [detection, probe], max_steps=8)

    assert fit_trainer.global_step == 8
    (event,) = detection.events
    assert (event.kind, event.step, event.layers, event.origin) == (
        "nonfinite",
        NAN_STEP,
        ("net.2",),
        "net.2",
    )
    assert event.action == "skip" and math.isnan(event.values[0])
    assert detection.counts["nonfinite"] == 1 and detection.counts["skipped_steps"] == 1
    for name, before in probe.before[NAN_STEP].items():
        assert torch.equal(probe.after[NAN_STEP][name], before), name
    # the steps around it did move the weights (the probe can see a change)
    assert not torch.equal(
        probe.after[NAN_STEP + 1]["net.2.weight"], probe.before[NAN_STEP + 1]["net.2.weight"]
    )
    assert probe.skipped == {step: step == NAN_STEP for step in range(8)}
    assert all(torch.isfinite(w).all() for w in probe.after[7].values())


def test_nan_with_warn_lets_the_nan_through(tmp_path):
    """The counterpart of the skip test: without the skip the weights become NaN."""
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="warn", log_every_n_steps=1)
    probe = WeightProbe()
    with pytest.warns(GradientAnomalyWarning) as warned:
        _fit(tmp_path, NaNModule(), [detection, probe], max_steps=5)
    messages = " ".join(str(w.message) for w in warned)
    assert "non-finite" in messages and "loss spike" in messages  # the NaN gets in
    assert torch.isnan(probe.after[NAN_STEP]["net.2.weight"]).any()
    assert detection.counts["skipped_steps"] == 0 and detection.events[0].action == "warn"


def test_nan_with_raise_names_the_layer(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="raise")
    with pytest.raises(GradientAnomalyError, match=r"'net\.2'") as info:
        _fit(tmp_path, NaNModule(layer="net.2"), [detection], max_steps=8)
    event = info.value.event
    assert (event.step, event.kind, event.layers, event.action) == (
        NAN_STEP,
        "nonfinite",
        ("net.2",),
        "raise",
    )
    assert detection.events == [event]


def test_nan_with_stop_ends_the_run_after_that_step(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="stop")
    with pytest.warns(GradientAnomalyWarning, match="non-finite.*Action: stop"):
        fit_trainer = _fit(tmp_path, NaNModule(layer="net.0"), [detection], max_steps=8)
    assert fit_trainer.global_step == NAN_STEP + 1
    assert detection.events[0].layers == ("net.0",)


def test_consecutive_skips_stop_cleanly(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip", max_consecutive_skips=3)
    module = NaNModule(nan_steps=tuple(range(2, 100)))
    with pytest.warns(GradientAnomalyWarning) as warned:
        fit_trainer = _fit(tmp_path, module, [detection], max_steps=20)
    messages = " ".join(str(w.message) for w in warned)
    assert "3 consecutive optimizer steps were skipped" in messages
    assert "non-finite (NaN/Inf) gradient at step 2" in messages
    assert fit_trainer.global_step == 5  # steps 2, 3, 4 skipped, then stopped
    assert detection.counts["skipped_steps"] == 3 and detection.counts["nonfinite"] == 3


def test_warnings_are_rate_limited_until_the_layer_recovers(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip", max_consecutive_skips=100)
    module = NaNModule(nan_steps=(1, 2, 3, 4, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, module, [detection], max_steps=8)
    messages = [str(w.message) for w in caught if issubclass(w.category, GradientAnomalyWarning)]
    # steps 1-4 are one condition (one warning), it clears at 5 and comes back at 6
    assert len(messages) == 2
    assert "Seen on 1 step(s)" in messages[0] and "Seen on 5 step(s)" in messages[1]
    assert detection.counts["nonfinite"] == 5 and len(detection.events) == 5


class _TwoOptimizers(TinyModule):
    """Manual optimization: ``net.0`` on one optimizer, ``net.2``/``net.4`` on another."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        x, y = batch
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        if batch_idx == 2:
            self.net[4].weight.grad[0, 0] = math.nan
        first.step()
        second.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        rest = [*self.net[2].parameters(), *self.net[4].parameters()]
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1, momentum=0.9),
            torch.optim.SGD(rest, lr=0.1, momentum=0.9),
        ]


def test_skip_acts_on_the_optimizer_whose_gradients_are_bad(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip")
    probe = WeightProbe()
    with pytest.warns(GradientAnomalyWarning, match="'net.4'"):
        _fit(tmp_path, _TwoOptimizers(), [detection, probe], max_steps=10)
    (event,) = detection.events
    assert event.layers == ("net.4",) and detection.counts["skipped_steps"] == 1
    before, after = probe.before[4], probe.after[5]  # batch 2: global steps 4 and 5
    assert not torch.equal(before["net.0.weight"], after["net.0.weight"])
    for name in ("net.2.weight", "net.2.bias", "net.4.weight", "net.4.bias"):
        assert torch.equal(before[name], after[name]), name
    assert all(torch.isfinite(p).all() for p in probe.after[9].values())


def test_fp16_overflow_with_grad_scaler_is_amp_overflow_not_anomaly(tmp_path):
    class Overflowing(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, _ = batch
            # under autocast the matmuls run in fp16; times the 2**16 loss scale the
            # backward overflows fp16 until the scaler has backed off
            return self(x * 100).float().square().mean() * 100

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu")
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    detection = GradientAnomalyDetection(on_nonfinite="raise")  # an anomaly would raise
    probe = WeightProbe()
    _fit(tmp_path, Overflowing(), [detection, probe], max_steps=6, plugins=[precision])

    assert detection.counts["amp_overflow"] >= 1
    assert scaler.get_scale() < 2.0**16  # the scaler really backed off
    assert detection.counts["nonfinite"] == 0 and detection.events == []
    assert detection.counts["skipped_steps"] == 0
    assert not any(probe.skipped.values())  # the scaler skips, not grad_guard


def test_exploding_skip_with_absolute_limit(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(
        on_exploding="skip", max_total_norm=1e-6, max_consecutive_skips=3
    )
    probe = WeightProbe()
    with pytest.warns(GradientAnomalyWarning, match="exploding"):
        fit_trainer = _fit(tmp_path, TinyModule(), [detection, probe], max_steps=10)
    assert fit_trainer.global_step == 3
    assert [e.rule for e in detection.events] == ["max_total_norm"] * 3
    assert detection.events[0].threshold == pytest.approx(1e-6)
    for name, before in probe.before[0].items():
        assert torch.equal(probe.after[2][name], before)


def test_counts_and_events_are_logged(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip", log_every_n_steps=2)
    with pytest.warns(GradientAnomalyWarning):
        _fit(tmp_path, NaNModule(), [detection], max_steps=8, log_every_n_steps=2)
    log_dir = f"{tmp_path}/lightning_logs/version_0"
    scalars = read_scalars(log_dir)
    nonfinite = scalars["grad_guard/anomalies/nonfinite"]
    assert sorted(nonfinite) == [0, 2, 4, 6]
    assert [nonfinite[s] for s in (0, 2, 4, 6)] == [0, 0, 1, 1]
    assert scalars["grad_guard/skipped_steps"][6] == 1
    assert scalars["grad_guard/anomalies/amp_overflow"][6] == 0
    accumulator = event_accumulator(log_dir)
    text_tag = f"{EVENTS_TEXT_TAG}/text_summary"  # where SummaryWriter.add_text puts it
    assert text_tag in accumulator.Tags()["tensors"]
    (text_event,) = accumulator.Tensors(text_tag)
    assert text_event.step == NAN_STEP
    assert b"net.2" in text_event.tensor_proto.string_val[0]


class _End(Callback):
    def __init__(self) -> None:
        self.done = False

    def on_train_end(self, trainer, pl_module) -> None:
        self.done = True


class _RepairNaN(Callback):
    """Runs after detection: zeroes NaN gradients so that a warn-only run keeps finite
    weights and the injected NaN stays a one-step event."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for param in pl_module.parameters():
            param.grad.nan_to_num_(0.0)


def test_warn_only_makes_no_host_sync_between_logging_steps(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(
        on_nonfinite="warn",
        on_exploding="warn",
        on_vanishing="warn",
        max_total_norm=1e3,
        spike_warmup_steps=4,
    )
    phase = _End()
    module = NaNModule(nan_steps=(13,))
    fit_trainer = trainer(
        tmp_path, callbacks=[phase, detection, _RepairNaN()], max_steps=30, log_every_n_steps=10
    )
    step_of = lambda: "end" if phase.done else fit_trainer.global_step  # noqa: E731
    with (
        pytest.warns(GradientAnomalyWarning, match="at step 13"),
        count_host_syncs(step_of) as calls,
    ):
        fit_trainer.fit(module, make_loader(n=240))
    logging_steps = {0, 10, 20}
    assert {step for step in calls if step not in logging_steps and step != "end"} == set()
    assert logging_steps <= set(calls)  # the counter does see the reads
    assert not detection.reads_every_step
    (event,) = detection.events
    # seen at step 13, read (and warned about) at the logging step 20
    assert (event.step, event.layers, event.action) == (13, ("net.2",), "warn")
    assert detection.counts["nonfinite"] == 1


def test_default_config_reads_once_per_step(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection()  # on_nonfinite="skip" needs a decision each step
    fit_trainer = trainer(
        tmp_path, callbacks=[detection], max_steps=12, log_every_n_steps=5, logger=False
    )
    with count_host_syncs(lambda: fit_trainer.global_step) as calls:
        fit_trainer.fit(TinyModule(), make_loader(n=96))
    # one packed transfer per step (a `.tolist()` of everything the step reports)
    assert all(calls[step] == 1 for step in range(12)), calls


def _digits_fit(tmp_path, model: nn.Module, steps: int = 30) -> GradientAnomalyDetection:
    from grad_guard.data import digits_loader
    from grad_guard.models import ImageClassifier

    detection = GradientAnomalyDetection(on_nonfinite="warn")
    fit_trainer = trainer(tmp_path, callbacks=[detection], max_steps=steps, logger=False)
    module = ImageClassifier(model, lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientAnomalyWarning)
        fit_trainer.fit(module, digits_loader(batch_size=64, seed=0))
    return detection


def test_vanishing_defaults_flag_deep_sigmoid_mlp(tmp_path):
    from grad_guard.models import DeepMLP

    torch.manual_seed(0)
    detection = _digits_fit(tmp_path, DeepMLP(64, 10, depth=20, width=64, activation="sigmoid"))
    vanishing = [e for e in detection.events if e.kind == "vanishing"]
    assert vanishing and vanishing[0].step == 9  # default patience: 10 steps
    assert "model.fc01" in vanishing[0].layers and "model.head" not in vanishing[0].layers
    assert vanishing[0].rule == "min_ratio"
    assert detection.counts["vanishing"] == 30 - 9  # every step from then on


@pytest.mark.parametrize("architecture", ["relu_he", "residual_bn"])
def test_vanishing_defaults_do_not_flag_healthy_deep_networks(tmp_path, architecture):
    from grad_guard.models import DeepMLP, ResidualMLP

    torch.manual_seed(0)
    if architecture == "relu_he":
        model = DeepMLP(64, 10, depth=20, width=64, activation="relu", init="he")
    else:
        model = ResidualMLP(64, 10, depth=20, width=64)
    detection = _digits_fit(tmp_path, model)
    assert detection.counts["vanishing"] == 0
    assert [e for e in detection.events if e.kind == "vanishing"] == []
    assert detection.counts["nonfinite"] == 0


class _UnusedBranch(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(4, 4)  # never called: no gradient, not vanishing
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_layers_without_gradient_are_not_vanishing(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_vanishing="raise", vanishing_patience=1)
    _fit(tmp_path, _UnusedBranch(), [detection], max_steps=4)
    assert detection.counts["vanishing"] == 0


def test_state_round_trip_and_distinct_state_keys(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip")
    with pytest.warns(GradientAnomalyWarning):
        _fit(tmp_path, NaNModule(), [detection], max_steps=6)
    state = detection.state_dict()
    assert state["counts"]["nonfinite"] == 1
    restored = GradientAnomalyDetection(on_nonfinite="skip")
    restored.load_state_dict(state)
    assert restored.events == detection.events and restored.counts == detection.counts
    assert torch.equal(
        restored.state_dict()["detectors"][0]["total"]["values"],
        state["detectors"][0]["total"]["values"],
    )
    # the class identifies the callback: a resume with other options keeps its state
    assert (
        GradientAnomalyDetection().state_key
        == GradientAnomalyDetection(on_nonfinite="raise").state_key
    )
    assert GradientAnomalyDetection().state_key == GradientAnomalyDetection().state_key


def test_checkpoint_resume_restores_counts_and_statistics(tmp_path):
    torch.manual_seed(0)
    detection = GradientAnomalyDetection(on_nonfinite="skip")
    first = trainer(tmp_path, callbacks=[detection], max_epochs=1, max_steps=-1)
    with pytest.warns(GradientAnomalyWarning):
        first.fit(NaNModule(), make_loader(n=48))
    checkpoint = f"{tmp_path}/resume.ckpt"
    first.save_checkpoint(checkpoint)

    resumed = GradientAnomalyDetection(on_nonfinite="skip")
    second = trainer(tmp_path, callbacks=[resumed], max_epochs=2, max_steps=-1)
    second.fit(NaNModule(nan_steps=()), make_loader(n=48), ckpt_path=checkpoint)
    assert resumed.counts["nonfinite"] == 1 and resumed.counts["skipped_steps"] == 1
    assert resumed.events == detection.events
    window = resumed.state_dict()["detectors"][0]["total"]
    assert second.global_step == 12
    assert window["count"].item() == 12 - 1  # 12 steps in all, the NaN one stayed out


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"on_exploding": "zero"}, "on_exploding"),
        ({"on_vanishing": "skip"}, "on_vanishing"),
        ({"max_total_norm": -1.0}, "max_total_norm"),
        ({"spike_z_threshold": 0}, "spike_z_threshold"),
        ({"spike_window": 0}, "spike_window"),
        ({"spike_warmup_steps": 500}, "spike_warmup_steps"),
        ({"vanishing_min_norm": float("inf")}, "vanishing_min_norm"),
        ({"vanishing_min_ratio": 2.0}, "vanishing_min_ratio"),
        ({"vanishing_patience": 0}, "vanishing_patience"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"granularity": "row"}, "granularity"),
        ({"norm_type": -2.0}, "norm_type"),
        ({"max_events": -1}, "max_events"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`") as info:
        GradientAnomalyDetection(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
