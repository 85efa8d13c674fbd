import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from grad_guard import GradientNormMonitor

from helpers import TinyModule, event_dirs, make_loader, read_scalars, trainer
from sync_counter import count_host_syncs


def _layer_norms(module: nn.Module, p: float = 2.0) -> dict[str, float]:
    """Independent per-module gradient norms, recomputed in float64."""
    out = {}
    for name, sub in module.named_modules():
        grads = [q.grad for q in sub.parameters(recurse=False) if q.grad is not None]
        if grads:
            out[name] = torch.linalg.vector_norm(
                torch.cat([g.double().flatten() for g in grads]), p
            ).item()
    return out


class RecordingModule(TinyModule):
    """Records what the gradients were at every optimizer step (runs after callbacks)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recorded: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, optimizer) -> None:
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.recorded[step] = _layer_norms(self)


def _assert_close(actual: float, expected: float, rel: float = 1e-5) -> None:
    assert actual == pytest.approx(expected, rel=rel), (actual, expected)


def test_logged_norms_equal_independent_computation(tmp_path):
    model = RecordingModule()
    t = trainer(tmp_path, max_steps=6, log_every_n_steps=2, callbacks=[GradientNormMonitor()])
    t.fit(model, make_loader())
    scalars = read_scalars(t.logger.log_dir)
    assert sorted(scalars["grad_norm/net.0"]) == [0, 2, 4]
    for step in (0, 2, 4):
        expected = model.recorded[step]
        for layer in ("net.0", "net.2", "net.4"):
            _assert_close(scalars[f"grad_norm/{layer}"][step], expected[layer])
        total = math.sqrt(sum(v * v for v in expected.values()))
        _assert_close(scalars["grad_guard/total_grad_norm"][step], total)
    # param norm, ratio and update ratio are there for every layer
    for prefix in ("param_norm", "grad_to_param", "update_ratio"):
        assert set(scalars[f"{prefix}/net.0"]) == {0, 2, 4}
    final_weight_norm = torch.linalg.vector_norm(
        torch.cat([model.net[0].weight.detach().flatten(), model.net[0].bias.detach().flatten()])
    ).item()
    assert scalars["param_norm/net.0"][4] == pytest.approx(final_weight_norm, rel=0.5)


def test_update_ratio_is_step_size_over_weights(tmp_path):
    class Plain(RecordingModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)  # update = lr * grad

        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            weights = [q.detach() for q in self.net[2].parameters()]
            self.weight_norm = getattr(self, "weight_norm", {})
            self.weight_norm[step] = torch.linalg.vector_norm(
                torch.cat([w.double().flatten() for w in weights])
            ).item()

    model = Plain(lr=0.05)
    t = trainer(tmp_path, max_steps=3, callbacks=[GradientNormMonitor(log_every_n_steps=1)])
    t.fit(model, make_loader())
    ratios = read_scalars(t.logger.log_dir)["update_ratio/net.2"]
    for step in range(3):
        expected = 0.05 * model.recorded[step]["net.2"] / model.weight_norm[step]
        _assert_close(ratios[step], expected, rel=1e-4)


def test_gradient_accumulation_logs_one_record_per_optimizer_step(tmp_path):
    model = RecordingModule()
    t = trainer(
        tmp_path,
        max_steps=3,
        accumulate_grad_batches=4,
        callbacks=[GradientNormMonitor(log_every_n_steps=1)],
    )
    t.fit(model, make_loader(n=96))
    scalars = read_scalars(t.logger.log_dir)
    assert sorted(scalars["grad_norm/net.0"]) == [0, 1, 2]
    for step in range(3):
        _assert_close(scalars["grad_norm/net.4"][step], model.recorded[step]["net.4"])


def test_mixed_precision_logs_unscaled_norms(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp_model = RecordingModule()
    initial_state = {k: v.clone() for k, v in amp_model.state_dict().items()}
    t = trainer(
        tmp_path,
        max_steps=2,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[GradientNormMonitor(log_every_n_steps=1, log_update_ratio=False)],
    )
    t.fit(amp_model, make_loader())
    amp = read_scalars(t.logger.log_dir)
    assert scaler.get_scale() >= 2.0**11  # a real scale was in force

    # the same first step in float32, no scaler: the unscaled truth
    fp32_model = RecordingModule()
    fp32_model.load_state_dict(initial_state)
    x, y = next(iter(make_loader()))
    nn.functional.cross_entropy(fp32_model(x), y).backward()
    expected = _layer_norms(fp32_model)
    for layer in ("net.0", "net.2", "net.4"):
        # fp16 autocast costs ~1e-3 precision; a scaled norm would be 4096x off
        assert amp[f"grad_norm/{layer}"][0] == pytest.approx(expected[layer], rel=2e-2)
        _assert_close(amp[f"grad_norm/{layer}"][1], amp_model.recorded[1][layer])


class TwoOptimizerModule(L.LightningModule):
    """A GAN-shaped manual-optimization module: each loss reaches both networks."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
        self.disc = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.recorded: dict[tuple[int, int], dict[str, float]] = {}

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        loss_g = -self.disc(self.gen(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        self.recorded[(0, step)] = _layer_norms(self.gen)
        opt_g.step()
        loss_d = self.disc(self.gen(x).detach()).mean() - self.disc(x).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        self.recorded[(1, step)] = _layer_norms(self.disc)
        opt_d.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.gen.parameters(), lr=0.01),
            torch.optim.SGD(self.disc.parameters(), lr=0.01),
        )


def test_manual_optimization_with_two_optimizers(tmp_path):
    model = TwoOptimizerModule()
    t = trainer(tmp_path, max_steps=6, callbacks=[GradientNormMonitor(log_every_n_steps=1)])
    t.fit(model, make_loader())
    scalars = read_scalars(t.logger.log_dir)
    gen_tags = {k for k in scalars if k.startswith("grad_norm/optimizer_0/")}
    disc_tags = {k for k in scalars if k.startswith("grad_norm/optimizer_1/")}
    assert gen_tags == {"grad_norm/optimizer_0/gen.0", "grad_norm/optimizer_0/gen.2"}
    assert disc_tags == {"grad_norm/optimizer_1/disc.0", "grad_norm/optimizer_1/disc.2"}
    steps = sorted(scalars["grad_norm/optimizer_0/gen.0"])
    assert steps == sorted(scalars["grad_norm/optimizer_1/disc.0"]) == [0, 1, 2]
    for step in steps:
        _assert_close(scalars["grad_norm/optimizer_0/gen.2"][step], model.recorded[(0, step)]["2"])
        _assert_close(scalars["grad_norm/optimizer_1/disc.0"][step], model.recorded[(1, step)]["0"])
        assert "grad_guard/optimizer_1/total_grad_norm" in scalars


def test_no_host_sync_on_non_logging_steps(tmp_path):
    t = trainer(
        tmp_path,
        max_steps=25,
        log_every_n_steps=10,
        callbacks=[GradientNormMonitor(histogram_every_n_steps=10)],
    )
    with count_host_syncs(lambda: t.fit_loop.epoch_loop._batches_that_stepped) as counts:
        t.fit(TinyModule(), make_loader(n=256))
    assert counts[0] > 0 and counts[10] > 0 and counts[20] > 0  # the counter does see syncs
    # 25: after the last step, the end of training reads the last update ratios
    assert {step for step in counts if step % 10} <= {25}


def test_csv_logger_gets_the_scalars(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, logger=logger, callbacks=[GradientNormMonitor(histogram_every_n_steps=1)])
    t.fit(TinyModule(), make_loader())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header = f.readline()
    assert "grad_norm/net.0" in header and "update_ratio/net.4" in header


def test_no_logger_warns_once_and_trains(tmp_path):
    t = trainer(tmp_path, logger=False, callbacks=[GradientNormMonitor()])
    with pytest.warns(UserWarning, match="no logger") as record:
        t.fit(TinyModule(), make_loader())
    assert sum("no logger" in str(w.message) for w in record) == 1
    assert t.global_step == 4


class TiedFrozenModule(TinyModule):
    def __init__(self) -> None:
        super().__init__(features=4, hidden=4, classes=4)
        self.net[4].weight = self.net[2].weight  # tied: 4x4
        self.net[0].requires_grad_(False)  # frozen


def test_tied_weights_counted_once_and_frozen_layer_absent(tmp_path):
    model = TiedFrozenModule()
    recorded = {}

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            recorded[trainer.global_step] = [q.grad.clone() for q in pl_module.net[2].parameters()]
            recorded[(trainer.global_step, "bias4")] = pl_module.net[4].bias.grad.clone()

    t = trainer(tmp_path, max_steps=2, callbacks=[GradientNormMonitor(), Spy()])
    t.fit(model, make_loader(classes=4))
    scalars = read_scalars(t.logger.log_dir)
    assert "grad_norm/net.0" not in scalars
    weight_grad, bias_grad = recorded[0]
    expected = torch.linalg.vector_norm(torch.cat([weight_grad.flatten(), bias_grad])).item()
    _assert_close(scalars["grad_norm/net.2"][0], expected)
    _assert_close(scalars["grad_norm/net.4"][0], recorded[(0, "bias4")].norm().item())


def test_histograms_are_capped_and_read_back(tmp_path):
    from helpers import event_accumulator

    t = trainer(
        tmp_path,
        max_steps=3,
        callbacks=[GradientNormMonitor(histogram_every_n_steps=2, max_histogram_layers=2)],
    )
    t.fit(TinyModule(), make_loader())
    accumulator = event_accumulator(t.logger.log_dir)
    assert sorted(accumulator.Tags()["histograms"]) == ["grad_hist/net.0", "grad_hist/net.2"]
    events = accumulator.Histograms("grad_hist/net.0")
    assert [e.step for e in events] == [0, 2]
    assert events[0].histogram_value.num == 4 * 8 + 8
    layout = accumulator.Tags()["tensors"]
    assert "custom_scalars__config__" in layout


def test_state_key_survives_changed_options():
    # the class identifies the monitor (one per Trainer): a resume with other options
    # finds its state, and what depends on the options is rebuilt
    a, b = GradientNormMonitor(), GradientNormMonitor(granularity="parameter")
    assert a.state_key == b.state_key
    a.logged_steps = 7
    b.load_state_dict(a.state_dict())
    assert b.logged_steps == 7


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"norm_type": -2}, "norm_type"),
        ({"granularity": "block"}, "granularity"),
        ({"include": "[unclosed"}, "include"),
        ({"histogram_every_n_steps": -1}, "histogram_every_n_steps"),
        ({"max_histogram_layers": 0}, "max_histogram_layers"),
        ({"histogram_bins": 1}, "histogram_bins"),
    ],
)
def test_invalid_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`.*got"):
        GradientNormMonitor(**kwargs)


def test_example_add_to_existing_trainer(tmp_path):
    import runpy
    import sys

    example = os.path.join(
        os.path.dirname(__file__), "..", "examples", "add_to_existing_trainer.py"
    )
    argv = sys.argv
    sys.argv = [example, "--root", str(tmp_path), "--steps", "5"]
    try:
        runpy.run_path(example, run_name="__main__")
    finally:
        sys.argv = argv
    dirs = event_dirs(str(tmp_path))
    assert dirs
    assert "grad_norm/encoder.0" in read_scalars(dirs[0])


def test_an_interval_that_logs_too_little_is_said_once_with_the_fix(tmp_path):
    # lightning-hydra-template: short epochs, the Trainer's default interval of 50
    t = trainer(
        tmp_path,
        max_steps=200,
        log_every_n_steps=50,
        logger=False,
        callbacks=[GradientNormMonitor(image_every_n_steps=None)],
    )
    with pytest.warns(
        UserWarning, match=r"200 optimizer steps gives only 4 logged step\(s\)"
    ) as record:
        t.fit(TinyModule(), make_loader(n=1600))
    advice = [w for w in record if "logged step(s)" in str(w.message)]
    assert len(advice) == 1 and "log_every_n_steps=4" in str(advice[0].message)


def test_a_histogram_interval_that_cannot_take_effect_is_said_at_setup(tmp_path):
    t = trainer(
        tmp_path,
        max_steps=2,
        log_every_n_steps=4,
        callbacks=[GradientNormMonitor(histogram_every_n_steps=6)],
    )
    with pytest.warns(UserWarning, match="histograms are written every 12 steps"):
        t.fit(TinyModule(), make_loader())
