"""``GradientGuard`` in plain PyTorch and Lightning Fabric loops, and their examples."""

import importlib.util
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from grad_guard.core.clip import AutoClip, NormClip, ZClip
from grad_guard.core.detect import DetectionConfig
from grad_guard.core.events import GradientAnomalyError, GradientAnomalyWarning
from grad_guard.loop import GradientGuard

from helpers import event_dirs, read_scalars
from sync_counter import count_host_syncs

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)


def _layer_norms(model: nn.Module) -> dict[str, float]:
    out = {}
    for name, sub in model.named_modules():
        grads = [p.grad for p in sub.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = torch.linalg.vector_norm(
                torch.cat([g.double().flatten() for g in grads])
            ).item()
    return out


class FakeWriter:
    """Records ``add_scalar`` calls: ``{tag: {step: value}}``."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.layouts = 0

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.setdefault(tag, {})[global_step] = value

    def add_custom_scalars(self, layout: dict) -> None:
        self.layouts += 1


def _train(guard: GradientGuard, model: nn.Module, optimizer, steps: int, nan_step: int = -1):
    results, recorded = [], {}
    for step in range(steps):
        x, y = _batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        if step == nan_step:
            loss = loss * float("nan")
        optimizer.zero_grad()
        loss.backward()
        recorded[step] = _layer_norms(model)
        result = guard.step(step)
        results.append(result)
        if result.should_step:
            optimizer.step()
    guard.flush()
    return results, recorded


def test_logged_norms_equal_independent_computation():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = FakeWriter()
    guard = GradientGuard(model, optimizer, writer=writer, log_every_n_steps=3)
    _, recorded = _train(guard, model, optimizer, steps=7)
    assert sorted(writer.scalars["grad_norm/0"]) == [0, 3, 6]
    for step in (0, 3, 6):
        for layer in ("0", "2", "4"):
            expected = recorded[step][layer]
            assert writer.scalars[f"grad_norm/{layer}"][step] == pytest.approx(expected, rel=1e-5)
        total = math.sqrt(sum(v * v for v in recorded[step].values()))
        assert writer.scalars["grad_guard/total_grad_norm"][step] == pytest.approx(total, rel=1e-5)
    # plain SGD: the update is lr * grad, so the ratio is lr * |g| / |w_before|
    assert sorted(writer.scalars["update_ratio/2"]) == [0, 3, 6]  # step 6 written by flush()
    assert 0 < writer.scalars["update_ratio/2"][3] < 1
    assert writer.layouts == 1


def test_update_ratio_is_step_size_over_weights():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = FakeWriter()
    guard = GradientGuard(model, optimizer, writer=writer, log_every_n_steps=2, detection=False)
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    before = torch.cat([p.detach().flatten().clone() for p in model[2].parameters()])
    grad = torch.cat([p.grad.flatten().clone() for p in model[2].parameters()])
    guard.step(0)
    optimizer.step()
    guard.flush()
    expected = (0.05 * grad.norm() / before.norm()).item()
    assert writer.scalars["update_ratio/2"][0] == pytest.approx(expected, rel=1e-4)


def test_nonfinite_step_is_skipped_and_weights_do_not_move():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    writer = FakeWriter()
    guard = GradientGuard(model, optimizer, writer=writer, log_every_n_steps=1)
    for step in range(3):  # build up momentum first
        x, y = _batch(step)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        guard.step(step)
        optimizer.step()
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(3)
    optimizer.zero_grad()
    (nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    with pytest.warns(GradientAnomalyWarning, match="non-finite"):
        result = guard.step(3)
    optimizer.step()  # called anyway: the gradients are None, so nothing moves
    assert not result.should_step and not result.should_stop
    assert all(p.grad is None for p in model.parameters())
    for before, after in zip(weights, model.parameters()):
        assert torch.equal(before, after)
    assert [e.kind for e in result.events] == ["nonfinite"]
    assert result.events[0].layers == ("0", "2", "4")
    assert guard.counts["skipped_steps"] == 1
    assert writer.scalars["grad_guard/skipped_steps"][3] == 1.0
    assert writer.scalars["grad_guard/anomalies/nonfinite"][3] == 1.0
    assert math.isnan(writer.scalars["grad_guard/total_grad_norm"][3])


def test_clipping_pre_and_post_norms():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = FakeWriter()
    guard = GradientGuard(
        model, optimizer, clipping=NormClip(max_norm=0.05), writer=writer, log_every_n_steps=1
    )
    results, recorded = _train(guard, model, optimizer, steps=4)
    for step, result in enumerate(results):
        total = math.sqrt(sum(v * v for v in recorded[step].values()))
        assert result.pre_clip_norm.item() == pytest.approx(total, rel=1e-5)
        assert result.post_clip_norm.item() == pytest.approx(0.05, rel=1e-3)
        assert result.clip_threshold.item() == pytest.approx(0.05)
        # the FAQ: per-layer and total tags are pre-clip, clip/post_norm is after
        assert writer.scalars["grad_guard/total_grad_norm"][step] > 0.05
        assert writer.scalars["grad_guard/clip/pre_norm"][step] == pytest.approx(total, rel=1e-5)
        assert writer.scalars["grad_guard/clip/post_norm"][step] == pytest.approx(0.05, rel=1e-3)
        assert writer.scalars["grad_guard/clip/clipped_fraction"][step] == 1.0
    # the gradients the optimizer saw were clipped
    norm_after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert norm_after.item() == pytest.approx(0.05, rel=1e-3)


def test_actions_raise_and_stop():
    model = _model()
    x, y = _batch(0)
    (nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    with pytest.raises(GradientAnomalyError) as info:
        GradientGuard(model, on_nonfinite="raise").step(0)
    assert info.value.event.kind == "nonfinite"

    with pytest.warns(GradientAnomalyWarning):
        result = GradientGuard(model, on_nonfinite="stop").step(0)
    assert result.should_stop and result.should_step

    config = DetectionConfig(max_total_norm=1e-9, spike_z_threshold=None)
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    guard = GradientGuard(model, detection=config, on_exploding="skip")
    with pytest.warns(GradientAnomalyWarning, match="exploding"):
        result = guard.step(0)
    assert not result.should_step and result.events[0].kind == "exploding"


def test_consecutive_skips_ask_to_stop():
    model = _model()
    guard = GradientGuard(model, max_consecutive_skips=3)
    stops = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(4):
            x, y = _batch(step)
            (nn.functional.mse_loss(model(x), y) * float("nan")).backward()
            stops.append(guard.step(step).should_stop)
    assert stops == [False, False, True, True]
    assert guard.counts["skipped_steps"] == 4


def test_no_host_sync_between_logging_steps():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = GradientGuard(
        model,
        optimizer,
        clipping=ZClip(warmup_steps=3),
        writer=FakeWriter(),
        log_every_n_steps=5,
        on_nonfinite="warn",
    )
    current = [0]
    with count_host_syncs(lambda: current[0]) as counts:
        for step in range(12):
            current[0] = step
            x, y = _batch(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            guard.step(step)
            optimizer.step()
    assert counts[0] > 0 and counts[5] > 0 and counts[10] > 0  # the counter does see syncs
    assert {step for step in counts if step % 5} == set()


def test_state_dict_resume_continues_exactly():
    def run(steps, guard_state=None, model_state=None):
        model = _model()
        if model_state is not None:
            model.load_state_dict(model_state)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        guard = GradientGuard(model, optimizer, clipping=ZClip(warmup_steps=3))
        if guard_state is not None:
            guard.load_state_dict(guard_state)
        thresholds = []
        for step in steps:
            x, y = _batch(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            thresholds.append(guard.step(step).clip_threshold.item())
            optimizer.step()
        return thresholds, guard.state_dict(), model.state_dict()

    full, _, _ = run(range(8))
    first, state, weights = run(range(4))
    second, _, _ = run(range(4, 8), state, weights)
    assert first + second == pytest.approx(full)
    assert math.isinf(full[0]) and math.isfinite(full[-1])  # warm-up then a real threshold


def test_logger_with_log_metrics_and_invalid_arguments():
    class Logger:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((step, dict(metrics)))

    model = _model()
    logger = Logger()
    guard = GradientGuard(model, writer=logger, log_every_n_steps=1, include="^[02]$")
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    guard.step()
    assert logger.calls and logger.calls[0][0] == 0
    assert {"grad_norm/0", "grad_norm/2"} <= set(logger.calls[0][1])
    assert "grad_norm/4" not in logger.calls[0][1]  # excluded by `include`

    for kwargs, name in [
        ({"writer": object()}, "writer"),
        ({"clipping": "zclip"}, "clipping"),
        ({"detection": "yes"}, "detection"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"on_exploding": "ignore"}, "on_exploding"),
        ({"norm_type": -1}, "norm_type"),
        ({"granularity": "layer"}, "granularity"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            GradientGuard(model, **kwargs)


def test_loop_module_does_not_import_lightning():
    code = (
        "import sys; from grad_guard.loop import GradientGuard; "
        "bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plain_loop_example_writes_per_layer_tags(tmp_path):
    logdir = str(tmp_path / "plain")
    with pytest.warns(GradientAnomalyWarning, match="non-finite"):
        guard = _example("plain_pytorch_loop.py").main(
            ["--logdir", logdir, "--steps", "41", "--log-every", "10", "--nan-step", "15"]
        )
    scalars = read_scalars(logdir)
    for prefix in ("grad_norm", "param_norm", "grad_to_param", "update_ratio"):
        for layer in ("0", "2", "4"):
            assert sorted(scalars[f"{prefix}/{layer}"]) == [0, 10, 20, 30, 40], (prefix, layer)
    for name in (
        "total_grad_norm",
        "clip/pre_norm",
        "clip/post_norm",
        "clip/clipped_fraction",
        "anomalies/nonfinite",
        "skipped_steps",
    ):
        assert f"grad_guard/{name}" in scalars, name
    assert 30 in scalars["grad_guard/clip/threshold"]  # ZClip armed after its 25-step warm-up
    assert scalars["grad_guard/anomalies/nonfinite"][20] == 1.0
    assert guard.counts["skipped_steps"] == 1


def test_fabric_example_writes_per_layer_tags(tmp_path):
    guard = _example("fabric_loop.py").main(
        ["--root", str(tmp_path), "--epochs", "2", "--log-every", "4"]
    )
    assert guard.layer_names == ("encoder.0", "encoder.2", "decoder.0", "decoder.2")
    (logdir,) = event_dirs(str(tmp_path))
    scalars = read_scalars(logdir)
    assert isinstance(guard.clipping, AutoClip)
    for layer in guard.layer_names:
        assert sorted(scalars[f"grad_norm/{layer}"]) == [0, 4, 8, 12]
        assert sorted(scalars[f"update_ratio/{layer}"]) == [0, 4, 8, 12]
    assert not any("_forward_module" in tag for tag in scalars)
    assert "loss" in scalars and "grad_guard/clip/post_norm" in scalars
