"""Activation statistics: the hooks core, the ActivationMonitor callback and the rules."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from grad_guard.callbacks.activations import HEATMAP_TAG, ActivationMonitor
from grad_guard.core.activation_history import ActivationHistory, activation_metrics
from grad_guard.core.activations import ActivationHooks, LayerActivations
from grad_guard.report.rules.activations import activations, diagnose_activations

from helpers import event_accumulator, event_dirs, read_scalars, trainer


def relu_mlp(dead_bias: float | None = -10.0, width: int = 64) -> nn.Sequential:
    """fc1-fc3 + ReLU, then a head; fc3's bias at ``dead_bias`` (layer names 0, 2, 4, 6)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, 4),
    )  # fmt: skip
    if dead_bias is not None:
        with torch.no_grad():
            model[4].bias.fill_(dead_bias)
    return model


def tanh_mlp(depth: int = 8, std: float = 3.0, width: int = 64) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=std)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


def measure(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> dict[str, LayerActivations]:
    hooks = ActivationHooks(model, **kwargs)
    hooks.arm()
    model(x)
    hooks.disarm()
    return hooks.read()


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------- the core


def test_a_bias_of_minus_10_kills_that_layers_relu_units_and_only_those():
    stats = measure(relu_mlp(), torch.randn(256, 16))
    assert stats["4"].dead_fraction >= 0.99
    for name in ("0", "2"):
        assert stats[name].dead_fraction < 0.5
    assert stats["6"].dead_fraction is None  # the head has no activation after it
    assert stats["4"].mean < -9.0
    assert {stats[n].activation for n in ("0", "2", "4")} == {"ReLU"}


def test_a_deep_tanh_mlp_with_weights_of_std_3_saturates():
    stats = measure(tanh_mlp(), torch.randn(256, 64))
    deep = [f"{2 * i}" for i in range(2, 8)]
    assert all(stats[n].saturated_fraction >= 0.8 for n in deep)
    assert all(stats[n].dead_fraction is None for n in deep)
    healthy = measure(tanh_mlp(std=1 / 8), torch.randn(256, 64))
    assert all(healthy[n].saturated_fraction < 0.05 for n in deep)


class Scale(nn.Module):
    """``x * weight`` elementwise (an Inf input stays Inf, unlike a matmul)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_statistics_are_exact_for_known_values():
    model = nn.Sequential(nn.Identity(), Scale(4), nn.Sigmoid())
    x = torch.tensor([[10.0, 0.0, -10.0, float("inf")], [0.0, 0.0, 0.0, 1.0]])
    stats = measure(model, x, saturation_threshold=0.99)
    layer = stats["1"]
    assert layer.nonfinite_fraction == pytest.approx(1 / 8)
    assert not math.isfinite(layer.mean) and math.isnan(layer.std)  # NaN/Inf outputs: no scale
    # sigmoid(10), sigmoid(-10), sigmoid(inf) are beyond 0.99 / below 0.01
    assert layer.saturated_fraction == pytest.approx(3 / 8)
    model = nn.Sequential(nn.Identity(), Scale(3), nn.Sigmoid())
    finite = measure(model, x[:, :3])["1"]
    assert finite.mean == pytest.approx(x[:, :3].mean().item(), abs=1e-6)
    assert finite.std == pytest.approx(x[:, :3].std(correction=0).item(), rel=1e-5)


def test_dead_units_are_zero_for_every_sample_of_the_batch():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.ReLU())
    nn.init.eye_(model[0].weight)
    x = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 2.0]])  # unit 1 never fires
    assert measure(model, x)["0"].dead_fraction == pytest.approx(1 / 3)


def test_one_shared_relu_is_attributed_to_the_layer_before_each_call():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            with torch.no_grad():
                self.fc2.bias.fill_(-100.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc2(self.act(self.fc1(x))))

    stats = measure(Shared(), torch.randn(64, 8))
    assert stats["fc2"].dead_fraction == 1.0
    assert stats["fc1"].dead_fraction < 0.5


def test_a_module_called_twice_combines_both_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.outputs = [self.fc(x), self.fc(3 * x + 1)]
            return self.outputs[1]

    model = Twice()
    stats = measure(model, torch.randn(32, 4))["fc"]
    both = torch.cat([o.detach().reshape(-1) for o in model.outputs])
    assert stats.mean == pytest.approx(both.mean().item(), rel=1e-5)
    assert stats.std == pytest.approx(both.std(correction=0).item(), rel=1e-5)


def test_block_granularity_reports_the_block_output_and_its_activations():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    )
    stats = measure(model, torch.randn(16, 8), granularity=1)
    assert list(stats) == ["0", "1"]
    assert stats["0"].activation == "Tanh" and stats["0"].saturated_fraction is not None
    assert stats["1"].activation == "ReLU" and stats["1"].dead_fraction is not None
    assert stats["1"].mean >= 0.0  # the block's output is after its ReLU


def test_an_excluded_or_frozen_layer_keeps_its_activation_from_the_layer_before():
    model = relu_mlp(dead_bias=-10.0)
    stats = measure(model, torch.randn(64, 16), exclude=r"^4$")
    assert "4" not in stats and stats["2"].dead_fraction < 0.5
    model[4].requires_grad_(False)
    stats = measure(model, torch.randn(64, 16))
    assert "4" not in stats and stats["2"].dead_fraction < 0.5


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_is_not_counted_twice(reentrant):
    model = relu_mlp(dead_bias=None)
    x = torch.randn(32, 16, requires_grad=True)
    plain = measure(model, x)
    hooks = ActivationHooks(model)
    hooks.arm()
    checkpoint(model, x, use_reentrant=reentrant).sum().backward()
    calls = len(hooks._rows)
    hooks.disarm()
    assert calls == 7  # four layers and three ReLUs, once each
    assert hooks.read() == plain


def test_hooks_do_no_host_sync_and_read_copies_once(monkeypatch):
    model = relu_mlp()
    hooks = ActivationHooks(model)
    hooks.arm()
    copies = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("host sync inside a hook")

    with monkeypatch.context() as patch:
        for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__"):
            patch.setattr(torch.Tensor, method, refuse)
        model(torch.randn(8, 16))
    hooks.disarm()
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a: copies.append(t.shape) or real_cpu(t))
    assert len(hooks.read()) == 4
    assert len(copies) == 1


def test_arm_and_disarm_leave_no_hook_behind():
    model = relu_mlp()
    hooks = ActivationHooks(model)
    hooks.arm()
    hooks.arm()  # idempotent
    assert hooks.hook_count == hooks_on(model) == 7
    hooks.disarm()
    assert hooks.hook_count == hooks_on(model) == 0


def test_compiled_modules_run_no_hooks_unless_dynamo_guards_on_them():
    import torch._dynamo

    model = relu_mlp()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    try:
        compiled(x)
        hooks = ActivationHooks(model)
        hooks.arm()
        compiled(x)
        hooks.disarm()
        assert hooks.read() == {}  # default: hooks on an already compiled graph never run
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            torch._dynamo.reset()
            compiled(x)
            hooks.arm()
            compiled(x)
            hooks.disarm()
            assert hooks.read().keys() == {"0", "2", "4", "6"}
    finally:
        torch._dynamo.reset()


def test_parameter_granularity_and_a_bad_threshold_are_refused():
    with pytest.raises(ValueError, match="`granularity` must be 'module' or a positive int"):
        ActivationHooks(relu_mlp(), granularity="parameter")
    with pytest.raises(ValueError, match=r"`saturation_threshold` must be a number >= 0\.5"):
        ActivationHooks(relu_mlp(), saturation_threshold=1.0)


# ---------------------------------------------------------------- history and rules


def test_history_round_trips_and_rebuilds_from_scalars():
    history = ActivationHistory(max_steps=4)
    for step in range(10):
        history.record(step, {"a": LayerActivations(0.0, float(step), 0.0, dead_fraction=0.5)})
    assert history.steps == [0, 4, 8]
    copy = ActivationHistory()
    copy.load_state_dict(history.state_dict())
    assert copy.steps == history.steps and copy.summary() == history.summary()
    scalars = {
        t: {0: v} for t, v in activation_metrics({"a": LayerActivations(1.0, 2.0, 0.0)}).items()
    }
    rebuilt = ActivationHistory.from_scalars({**scalars, "grad_norm/a": {0: 1.0}})
    assert rebuilt.layers == ["a"] and rebuilt.matrix("std").tolist() == [[2.0]]


def test_the_rules_name_dead_units_saturation_growth_and_nonfinite_outputs():
    dead = diagnose_activations(measure(relu_mlp(), torch.randn(256, 16)))
    assert [f.rule for f in dead] == ["dead_units"]
    assert dead[0].layers == ["4"]
    assert dead[0].title.startswith("4: 100 % of ReLU units dead -> lower the LR")
    saturated = diagnose_activations(measure(tanh_mlp(), torch.randn(256, 64)))
    assert [f.rule for f in saturated] == ["saturated_activations"]
    assert saturated[0].title.startswith("0-14: tanh outputs")
    assert "use ReLU + He init" in saturated[0].title
    growing = {f"b{i}": LayerActivations(0.0, 3.0**i, 0.0) for i in range(5)}
    growing["b4"] = LayerActivations(math.nan, math.nan, 0.25)
    found = {f.rule: f for f in diagnose_activations(growing)}
    assert found["activation_growth"].title.startswith("activation scale grows x3.0 per layer")
    assert found["nonfinite_activations"].layers == ["b4"]
    assert diagnose_activations(measure(relu_mlp(dead_bias=None), torch.randn(256, 16))) == []


def test_the_registry_rule_reads_the_evidence_activations():
    class Evidence:
        activations = ActivationHistory()

    assert activations(Evidence()) == []
    Evidence.activations.record(0, measure(relu_mlp(), torch.randn(64, 16)))
    assert [f.rule for f in activations(Evidence())] == ["dead_units"]
    assert activations(object()) == []


# ---------------------------------------------------------------- the Lightning callback


class DeadReluModule(L.LightningModule):
    """``relu_mlp`` as a LightningModule that records the forward hooks of each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = relu_mlp()
        self.hooks_seen: list[tuple[int, int]] = []  # (global_step, hooks on the model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.hooks_seen.append((self.global_step, hooks_on(self)))
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (n,), generator=generator)), 8)


def test_fit_logs_the_tags_on_logging_steps_with_no_hook_in_between(tmp_path):
    module, monitor = DeadReluModule(), ActivationMonitor(log_every_n_steps=2, image_every_n_steps=1)
    trainer(tmp_path, max_steps=6, callbacks=[monitor]).fit(module, loader())
    assert [count for _, count in module.hooks_seen] == [7, 0, 7, 0, 7, 0]
    assert monitor.hook_count == 0 and hooks_on(module) == 0
    log_dir = trainer_dir(tmp_path)
    scalars = read_scalars(log_dir)
    for prefix in ("activation_mean", "activation_std", "nonfinite_fraction"):
        for layer in ("net.0", "net.2", "net.4", "net.6"):
            assert sorted(scalars[f"{prefix}/{layer}"]) == [0, 2, 4]
    assert min(scalars["dead_fraction/net.4"].values()) >= 0.99
    assert max(scalars["dead_fraction/net.0"].values()) < 0.5
    assert "dead_fraction/net.6" not in scalars and "saturated_fraction/net.0" not in scalars
    assert HEATMAP_TAG in event_accumulator(log_dir).Tags()["images"]
    assert monitor.history.steps == [0, 2, 4]
    assert [f.rule for f in activations(type("Ev", (), {"activations": monitor.history}))] == [
        "dead_units"
    ]


def trainer_dir(tmp_path: Any) -> str:
    (log_dir,) = event_dirs(str(tmp_path))
    return log_dir


def test_the_trainer_interval_is_the_default_and_accumulation_arms_one_micro_batch(tmp_path):
    module, monitor = DeadReluModule(), ActivationMonitor(image_every_n_steps=None)
    fit = trainer(tmp_path, max_steps=3, log_every_n_steps=1, accumulate_grad_batches=2)
    fit.callbacks.append(monitor)
    fit.fit(module, loader())
    assert module.hooks_seen == [(0, 7), (0, 0), (1, 7), (1, 0), (2, 7), (2, 0)]
    assert monitor.history.steps == [0, 1, 2] and monitor.logged_steps == 3


def test_state_survives_a_checkpoint(tmp_path):
    module, monitor = DeadReluModule(), ActivationMonitor(log_every_n_steps=1)
    trainer(tmp_path, max_steps=2, callbacks=[monitor]).fit(module, loader())
    restored = ActivationMonitor(log_every_n_steps=5)
    assert restored.state_key == monitor.state_key
    restored.load_state_dict(monitor.state_dict())
    assert restored.history.steps == [0, 1] and restored.logged_steps == 2
    assert restored.history.summary() == monitor.history.summary()
    assert ActivationMonitor(exclude="net.0").state_key == monitor.state_key


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("log_every_n_steps", 0),
        ("granularity", "parameter"),
        ("granularity", True),
        ("include", "("),
        ("exclude", [3]),
        ("saturation_threshold", True),
        ("saturation_threshold", 0.2),
        ("image_every_n_steps", 0),
        ("history_size", 1),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ActivationMonitor(**{argument: value})


@pytest.mark.slow
def test_a_compiled_model_makes_the_monitor_warn_that_its_hooks_did_not_run(tmp_path):
    import torch._dynamo

    module = DeadReluModule()
    module.net = torch.compile(module.net, backend="eager")
    monitor = ActivationMonitor(log_every_n_steps=2, image_every_n_steps=None)
    torch._dynamo.reset()
    try:
        with pytest.warns(UserWarning, match="hooks did not run"):
            trainer(tmp_path, max_steps=3, callbacks=[monitor]).fit(module, loader())
    finally:
        torch._dynamo.reset()
    # step 0 compiled the graph with the hooks in it; step 1 recompiled it without them
    # (dynamo guards on hooks it traced); step 2's new hooks never run
    assert monitor.history.steps == [0] and hooks_on(module) == 0


def test_the_health_report_says_which_layers_units_are_dead_and_which_saturate(tmp_path):
    from grad_guard import GradientNormMonitor
    from grad_guard.report import build_report

    module, gradients = DeadReluModule(), GradientNormMonitor(image_every_n_steps=None)
    monitor = ActivationMonitor(image_every_n_steps=None)
    trainer(tmp_path, max_steps=3, callbacks=[gradients, monitor]).fit(module, loader())
    report = build_report(gradients.history, model=module, activations=monitor.history)
    dead = [f for f in report.findings if f.rule == "dead_units"]
    assert len(dead) == 1 and dead[0].layers == ["net.4"]
    assert "net.4: 100 % of ReLU units dead" in report.render_text()
    saturated = build_report(
        gradients.history, activations={"net.2": measure(tanh_mlp(), torch.randn(64, 64))["4"]}
    )
    assert "net.2: tanh outputs" in saturated.render_text()
    assert "use ReLU + He init" in saturated.render_text()


def test_a_batch_skipped_by_the_module_does_not_leave_hooks_for_the_next_one(tmp_path):
    class SkipsFirst(DeadReluModule):
        def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
            self.hooks_seen.append((-1, hooks_on(self)))  # after the monitor armed
            return -1 if batch_idx == 0 and self.current_epoch == 0 else None

    module = SkipsFirst()
    monitor = ActivationMonitor(log_every_n_steps=2, image_every_n_steps=None)
    trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[monitor]).fit(
        module, loader()
    )
    in_steps = [(step, count) for step, count in module.hooks_seen if step >= 0]
    assert [count for _, count in in_steps] == [7 if s % 2 == 0 else 0 for s, _ in in_steps]
    assert hooks_on(module) == 0


def test_weights_three_times_he_make_the_activation_scale_grow_x3_per_layer():
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        linear = nn.Linear(256, 256, bias=False)
        nn.init.normal_(linear.weight, std=3 * math.sqrt(2 / 256))
        layers += [linear, nn.ReLU()]
    stats = measure(nn.Sequential(*layers), torch.randn(512, 256))
    found = {f.rule: f for f in diagnose_activations(stats)}
    growth = found["activation_growth"]
    factor = float(growth.title.split(" x", 1)[1].split(" ", 1)[0])
    assert 2.7 <= factor <= 3.3
    assert growth.title.endswith("-> add normalization or residual scaling")


def test_gradguard_with_activations_logs_them_and_its_report_names_the_dead_layer(tmp_path):
    from grad_guard import GradGuard

    guard = GradGuard(activations=True, clipping=None, print_report=False)
    fit = trainer(tmp_path, max_steps=3, callbacks=[guard])
    fit.fit(DeadReluModule(), loader())
    scalars = read_scalars(fit.logger.log_dir)
    assert scalars["dead_fraction/net.4"][0] >= 0.99 and scalars["grad_norm/net.4"]
    report = guard.last_report
    assert report is not None and "net.4: 100 % of ReLU units dead" in report.render_text()
    state = guard.state_dict()
    assert set(state) == {"monitor", "detection", "activations"}
