"""The experiment runner behind ``grad-guard demo`` (grad_guard.demo.runner, .experiments)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from grad_guard.demo.settings import DEFAULT_STEPS
from grad_guard.experiments import (
    OUTCOMES,
    Experiment,
    ExperimentResult,
    default_experiments,
    probe_gradients,
    run_experiment,
    run_experiments,
)

TINY = {"depth": 3, "width": 16, "activation": "relu", "init": "he"}


def _run(exp: Experiment, tmp_path: Path, **kwargs) -> ExperimentResult:
    kwargs.setdefault("progress_bar", False)
    return run_experiment(exp, tmp_path, **kwargs)


class _CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps += 1


def test_tiny_experiment_returns_sensible_fields(tmp_path: Path) -> None:
    counter = _CountSteps()
    exp = Experiment("tiny", model_kwargs=TINY, lesson="a test")
    result = _run(exp, tmp_path, callbacks=[counter], steps=5)

    assert result.name == "tiny" and result.experiment is exp
    assert counter.steps == 5 == result.steps_run
    assert len(result.loss_history) == len(result.grad_norm_history) == 5
    assert all(math.isfinite(v) for v in result.loss_history + result.grad_norm_history)
    assert result.diverged_at is None and not result.diverged and result.nonfinite_steps == 0
    assert (result.first_layer, result.last_layer) == ("fc1", "head")
    assert list(result.initial_grad_norms) == ["fc1", "fc2", "head"]
    expected_ratio = result.initial_grad_norms["fc1"] / result.initial_grad_norms["head"]
    assert result.grad_ratio == pytest.approx(expected_ratio)
    assert 0.0 <= result.train_accuracy <= 1.0 and math.isfinite(result.final_loss)
    assert result.clipped_by is None and result.extras == {}
    assert result.wall_time_s > 0
    assert isinstance(result.model, nn.Module)

    log_dir = Path(result.log_dir)
    assert log_dir.parent == tmp_path / "tiny"
    assert list(log_dir.glob("events.out.tfevents.*"))
    json.dumps(result.to_dict())  # plain values only


def test_tensorboard_gets_the_training_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run(Experiment("tb", model_kwargs=TINY), tmp_path, steps=4)
    events = EventAccumulator(result.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "train_acc", "final/train_accuracy"} <= tags
    assert len(events.Scalars("train_loss")) == 4


def test_diverging_run_reports_the_step_and_does_not_crash(tmp_path: Path) -> None:
    exp = Experiment("boom", model_kwargs=TINY, lr=1e10, momentum=0.0)
    result = _run(exp, tmp_path, steps=50, stop_after_nonfinite=3)

    assert result.diverged and result.diverged_at is not None
    assert 0 < result.diverged_at < 10
    assert math.isfinite(result.loss_history[result.diverged_at - 1])
    assert not math.isfinite(result.loss_history[result.diverged_at])
    # NaN weights stay NaN: stopped after three non-finite steps in a row
    assert result.steps_run == result.diverged_at + 3 == len(result.loss_history)
    assert result.nonfinite_steps == 3
    assert math.isnan(result.final_loss)


def test_stop_after_nonfinite_none_trains_every_step(tmp_path: Path) -> None:
    exp = Experiment("boom", model_kwargs=TINY, lr=1e10, momentum=0.0)
    result = _run(exp, tmp_path, steps=12, stop_after_nonfinite=None)
    assert result.steps_run == 12
    assert result.nonfinite_steps == 12 - result.diverged_at


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path) -> None:
    exp = Experiment("seeded", model_kwargs=TINY)
    a = _run(exp, tmp_path, steps=4, seed=1)
    b = _run(exp, tmp_path, steps=4, seed=1)
    c = _run(exp, tmp_path, steps=4, seed=2)
    assert a.loss_history == b.loss_history and a.grad_ratio == b.grad_ratio
    assert a.loss_history != c.loss_history


def test_norm_clipping_is_applied_by_the_trainer(tmp_path: Path) -> None:
    exp = Experiment(
        "clip", model_kwargs=TINY, clip_algorithm="norm", clip_kwargs={"max_norm": 1e-7}
    )
    result = _run(exp, tmp_path, steps=3, seed=0)
    assert result.clipped_by == "trainer"
    # the grad norm recorded is the raw one, before clipping
    assert min(result.grad_norm_history) > 1e-3
    pl.seed_everything(0, verbose=False)
    initial = exp.build_model(64, 10)
    for (name, before), after in zip(
        initial.state_dict().items(), result.model.state_dict().values(), strict=True
    ):
        # 3 steps of lr 0.1 with |g| <= 1e-7 (momentum 0.9) move a weight by < 1e-7
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0, msg=name)

    unclipped = _run(Experiment("free", model_kwargs=TINY), tmp_path, steps=3, seed=0)
    changes = [
        (a - b).abs().max().item()
        for a, b in zip(
            initial.state_dict().values(), unclipped.model.state_dict().values(), strict=True
        )
    ]
    assert max(changes) > 1e-3


def test_adaptive_clipping_is_left_to_the_callbacks(tmp_path: Path) -> None:
    plain = _run(Experiment("plain", model_kwargs=TINY), tmp_path, steps=4)
    zclip = Experiment("z", model_kwargs=TINY, clip_algorithm="zscore", clip_kwargs={})
    result = _run(zclip, tmp_path, steps=4)
    assert result.clipped_by == "callbacks"
    assert result.loss_history == plain.loss_history  # the runner itself did not clip
    norm = Experiment("n", model_kwargs=TINY, clip_algorithm="norm", clip_kwargs={"max_norm": 1.0})
    assert _run(norm, tmp_path, steps=1, trainer_clipping=False).clipped_by == "callbacks"


def test_resnet_and_custom_models(tmp_path: Path) -> None:
    resnet = Experiment("resnet", model="resnet", model_kwargs={"depth": 8, "width": 4})
    assert not resnet.flat_inputs
    result = _run(resnet, tmp_path, steps=2)
    assert (result.first_layer, result.last_layer) == ("conv1", "fc")

    def tiny_linear(in_features: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(in_features, num_classes))

    custom = Experiment("custom", model=tiny_linear, dataset="synthetic")
    result = _run(custom, tmp_path, steps=2)
    assert result.grad_ratio == 1.0 and result.first_layer == "0"
    assert result.to_dict()["experiment"]["model"] == "tiny_linear"


def test_run_experiments_builds_fresh_callbacks(tmp_path: Path) -> None:
    made: list[_CountSteps] = []

    def factory(exp: Experiment) -> list[Callback]:
        made.append(_CountSteps())
        return [made[-1]]

    exps = [Experiment(name, model_kwargs=TINY) for name in ("one", "two")]
    results = run_experiments(exps, tmp_path, factory, steps=2, progress_bar=False)
    assert [r.name for r in results] == ["one", "two"]
    assert [c.steps for c in made] == [2, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_probe_gradients_leaves_the_model_untouched() -> None:
    from grad_guard.models import ResidualMLP

    torch.manual_seed(0)
    model = ResidualMLP(64, 10, depth=4, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = probe_gradients(model, (torch.randn(16, 64), torch.randint(0, 10, (16,))))
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)  # BN running stats too
    assert (probe.first_layer, probe.last_layer) == ("stem", "head")
    assert "blocks.1.norm" in probe.layer_norms  # reported, but not used for the ratio


# --------------------------------------------------------------------------- the demo's rows


def test_default_experiments_rows() -> None:
    exps = default_experiments()
    names = [e.name for e in exps]
    assert names == [
        "sigmoid-default", "tanh-xavier", "relu-he", "relu-he-lr0.1",
        "relu-he-lr0.1-clip-norm", "relu-he-lr0.1-autoclip", "relu-he-lr0.1-agc",
        "relu-he-lr0.1-zclip", "residual-bn",
    ]  # fmt: skip
    by_name = dict(zip(names, exps, strict=True))
    assert by_name["sigmoid-default"].expected == "vanishes"
    assert by_name["relu-he-lr0.1"].expected == "diverges"
    assert by_name["relu-he-lr0.1-clip-norm"].clip_kwargs == {"max_norm": 1.0}
    assert by_name["relu-he-lr0.1-zclip"].clip_algorithm == "zscore"
    assert by_name["relu-he-lr0.1-autoclip"].clip_algorithm == "autoclip"
    # the clipped rows are the diverging row plus a clipper, nothing else
    base = by_name["relu-he-lr0.1"].to_dict()
    for exp in exps:
        assert exp.batch_size == 64 and exp.steps == DEFAULT_STEPS and exp.lesson
        assert exp.expected in OUTCOMES
        if exp.clip_algorithm is not None:
            assert exp.expected == "rescued" or exp.clip_algorithm == "zscore"
            clipped = {**exp.to_dict(), "name": base["name"], "expected": base["expected"]}
            clipped.update(clip_algorithm=None, clip_kwargs={}, lesson=base["lesson"])
            assert clipped == base, exp.name
        model = exp.build_model(64, 10)
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == exp.model_kwargs["depth"]
        json.dumps(exp.to_dict())
    assert [e.steps for e in default_experiments(depth=6, steps=40, relu_depth=4)] == [40] * 9
    assert default_experiments(relu_depth=8)[3].model_kwargs["depth"] == 8


def test_legacy_expectation_names_are_read_as_outcomes() -> None:
    assert Experiment("x", expected="healthy").expected == "learns"
    assert Experiment("x", expected="vanishing").expected == "vanishes"
    assert Experiment("x", expected="exploding").expected == "diverges"


def test_old_import_paths_still_work() -> None:
    import grad_guard.data
    import grad_guard.demo.data
    import grad_guard.demo.runner

    assert grad_guard.data.digits_loader is grad_guard.demo.data.digits_loader
    assert run_experiment is grad_guard.demo.runner.run_experiment


def test_short_runs_show_vanishing_and_its_fix(tmp_path: Path) -> None:
    exps = {e.name: e for e in default_experiments(steps=40)}
    sigmoid = _run(exps["sigmoid-default"], tmp_path)
    residual = _run(exps["residual-bn"], tmp_path)
    assert sigmoid.grad_ratio < 1e-6 and sigmoid.train_accuracy < 0.2
    assert 0.1 < residual.grad_ratio < 10 and residual.train_accuracy > 0.8


@pytest.mark.slow
def test_high_lr_diverges_and_norm_clipping_rescues_it(tmp_path: Path) -> None:
    exps = {e.name: e for e in default_experiments()}
    exploding = _run(exps["relu-he-lr0.1"], tmp_path)
    clipped = _run(exps["relu-he-lr0.1-clip-norm"], tmp_path)  # Lightning's clipping
    # diverges: NaN, or the gradient norm grew 100-fold and the network died (seed 0)
    first = exploding.grad_norm_history[0]
    assert exploding.diverged_at is not None or exploding.max_grad_norm > 100 * first
    assert exploding.train_accuracy < 0.2
    assert clipped.diverged_at is None and clipped.train_accuracy > 0.9


# --------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"model": "transformer"}, "model"),
        ({"model_kwargs": [("depth", 3)]}, "model_kwargs"),
        ({"lr": 0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"clip_algorithm": "zclip"}, "clip_algorithm"),
        ({"clip_algorithm": "norm"}, "clip_kwargs"),
        ({"clip_algorithm": "value", "clip_kwargs": {"clip_value": -1}}, "clip_kwargs"),
        ({"clip_kwargs": None}, "clip_kwargs"),
        ({"expected": "divergent"}, "expected"),
        ({"expected": "learned"}, "expected"),
        ({"dataset": "mnist"}, "dataset"),
        ({"flatten": "yes"}, "flatten"),
    ],
)
def test_experiment_rejects_invalid_fields(kwargs: dict, argument: str) -> None:
    kwargs = {"name": "x", **kwargs}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        Experiment(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"steps": 0}, "steps"),
        ({"stop_after_nonfinite": 0}, "stop_after_nonfinite"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_run_experiment_rejects_invalid_arguments(
    tmp_path: Path, kwargs: dict, argument: str
) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        run_experiment(Experiment("x"), tmp_path, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"depth": 1}, "depth"), ({"steps": 0}, "steps"), ({"relu_depth": True}, "relu_depth")],
)
def test_default_experiments_rejects_invalid_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=f"`{argument}`"):
        default_experiments(**kwargs)
