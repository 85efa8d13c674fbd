"""examples/hydra: grad_guard's callbacks built by ``hydra.utils.instantiate`` from YAML."""

import importlib.util
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import grad_guard

from helpers import read_scalars

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "hydra")
CONFIGS = os.path.abspath(os.path.join(EXAMPLE, "configs"))


@pytest.fixture
def train(monkeypatch):
    """examples/hydra/train.py as a module, with its folder importable (``lit_random``)."""
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLE))
    spec = importlib.util.spec_from_file_location("hydra_example_train", f"{EXAMPLE}/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _callback_file(name: str):
    return OmegaConf.load(os.path.join(CONFIGS, "callbacks", f"{name}.yaml"))


def _arguments(config) -> dict:
    return {k: v for k, v in OmegaConf.to_container(config).items() if k != "_target_"}


def _stored(part, name: str):
    """An argument as the callback keeps it: an attribute, or one of its ``config``."""
    if hasattr(part, name):
        return getattr(part, name)
    return getattr(part.config, name)


def test_grad_guard_yaml_builds_the_nested_parts_with_their_arguments():
    config = _callback_file("grad_guard").grad_guard
    guard = instantiate(config)

    assert type(guard) is grad_guard.GradGuard
    assert type(guard.monitor) is grad_guard.GradientNormMonitor
    assert type(guard.detection) is grad_guard.GradientAnomalyDetection
    assert type(guard.clipping.algorithm) is grad_guard.ZClip
    for part, section in ((guard.monitor, "monitor"), (guard.detection, "detection")):
        for name, value in _arguments(config[section]).items():
            assert _stored(part, name) == value, (section, name)
    for name, value in _arguments(config.clipping).items():
        assert getattr(guard.clipping.algorithm, name) == value, ("clipping", name)
    assert guard.report is config.report is True


def test_command_line_overrides_reach_the_callback():
    cfg = _compose(
        "callbacks.grad_guard.detection.on_vanishing=stop",
        "callbacks.grad_guard.clipping._target_=grad_guard.AutoClip",
        "~callbacks.grad_guard.clipping.alpha",
        "~callbacks.grad_guard.clipping.z_threshold",
        "~callbacks.grad_guard.clipping.warmup_steps",
        "+callbacks.grad_guard.clipping.percentile=25.0",
    )
    guard = instantiate(cfg.callbacks.grad_guard)
    assert guard.detection.on_vanishing == "stop"
    assert type(guard.clipping.algorithm) is grad_guard.AutoClip
    assert guard.clipping.algorithm.percentile == 25.0


def test_a_bad_value_in_the_yaml_names_the_argument():
    config = _callback_file("grad_guard").grad_guard
    config.detection.on_nonfinite = "explode"
    with pytest.raises(InstantiationException, match=r"on_nonfinite.*explode"):
        instantiate(config)


def test_parts_switched_off_with_false_and_null():
    config = _callback_file("grad_guard").grad_guard
    config.monitor, config.clipping = False, None
    guard = instantiate(config)
    assert guard.monitor is None and guard.clipping is None
    assert type(guard.detection) is grad_guard.GradientAnomalyDetection


def test_gradient_clipping_yaml_builds_the_algorithm():
    config = _callback_file("gradient_clipping").gradient_clipping
    clipping = instantiate(config)
    assert type(clipping) is grad_guard.GradientClipping
    assert type(clipping.algorithm) is grad_guard.AutoClip
    assert clipping.algorithm.percentile == 10.0


def test_deprecated_clipping_name_still_builds_from_yaml_and_says_so():
    config = _callback_file("adaptive_gradient_clipping").adaptive_gradient_clipping
    with pytest.warns(DeprecationWarning, match="`AdaptiveGradientClipping` is now `GradientClipping`"):
        clipping = instantiate(config)
    assert isinstance(clipping, grad_guard.GradientClipping)
    assert type(clipping.algorithm) is grad_guard.AutoClip
    assert clipping.algorithm.percentile == 10.0


FIT = (
    "+trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "data.samples=64",
    "callbacks.grad_guard.report=false",
)


def test_two_step_fit_through_the_example_train_script(train, tmp_path):
    trainer = train.fit(_compose(f"paths.output_dir={tmp_path}", *FIT))

    assert trainer.global_step == 2
    (guard,) = [cb for cb in trainer.callbacks if isinstance(cb, grad_guard.GradGuard)]
    assert guard.detection.on_nonfinite == "skip"
    scalars = read_scalars(trainer.logger.log_dir)
    assert str(trainer.logger.log_dir).startswith(str(tmp_path))
    layers = sorted(tag for tag in scalars if tag.startswith("grad_norm/"))
    assert layers == [f"grad_norm/net.{i}" for i in (0, 10, 12, 2, 4, 6, 8)]
    assert all(set(scalars[tag]) == {0, 1} for tag in layers), {t: scalars[t] for t in layers}


def test_a_yaml_list_of_layer_patterns_selects_those_layers(train, tmp_path):
    # Hydra hands a YAML list over as an omegaconf ListConfig (a Sequence, not a list)
    overrides = (f"paths.output_dir={tmp_path}", *FIT)
    cfg = _compose(*overrides, "callbacks.grad_guard.monitor.include=[net\\.0$,net\\.2$]")
    trainer = train.fit(cfg)
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(t for t in scalars if t.startswith("grad_norm/")) == [
        "grad_norm/net.0",
        "grad_norm/net.2",
    ]
