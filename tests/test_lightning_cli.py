"""grad_guard's callbacks and algorithms configured by LightningCLI (real jsonargparse)."""

import copy
import importlib
import inspect
import os
import sys
import typing

import pytest
import yaml
from jsonargparse import ArgumentParser

import grad_guard
from grad_guard.core.clip import AGC, AutoClip, NormClip, ValueClip, ZClip

from helpers import event_dirs, read_scalars

CLI_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "lightning_cli")
CONFIG = os.path.join(CLI_DIR, "config.yaml")
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


@pytest.fixture
def cli_main(monkeypatch):
    """The example's ``cli_main``, imported from its folder as ``python main.py`` would."""
    monkeypatch.syspath_prepend(CLI_DIR)
    monkeypatch.setattr(sys, "argv", ["main.py"])  # pytest's own arguments are not for the CLI
    for name in ("main", "model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("main")
    yield module.cli_main
    for name in ("main", "model"):
        sys.modules.pop(name, None)


def _ours(trainer) -> list:
    return [c for c in trainer.callbacks if type(c).__module__.startswith("grad_guard")]


def _config_with(tmp_path, edit) -> str:
    with open(CONFIG) as f:
        config = yaml.safe_load(f)
    edit(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _entries(node):
    """Every ``{class_path, init_args}`` entry in a config, nested ones included."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield node
        for value in node.values():
            yield from _entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _entries(value)


def _callback_args(config: dict, name: str) -> dict:
    for entry in _entries(config["trainer"]["callbacks"]):
        if entry["class_path"] == f"grad_guard.{name}":
            return entry.setdefault("init_args", {})
    raise KeyError(name)


def _algorithm_args(config: dict) -> dict:
    return _callback_args(config, "ZClip")


def test_example_config_fits_a_few_steps(cli_main, tmp_path):
    cli = cli_main(
        [
            "fit",
            f"--config={CONFIG}",
            "--trainer.max_steps=12",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
        ]
    )
    assert cli.trainer.global_step == 12
    (guard,) = _ours(cli.trainer)
    assert isinstance(guard, grad_guard.GradGuard)
    # the nested class_paths became real objects with the YAML's arguments
    assert guard.detection.on_nonfinite == "skip" and guard.monitor.histogram_every_n_steps == 50
    zclip = guard.clipping.algorithm
    assert isinstance(zclip, ZClip) and zclip.z_threshold == 2.5 and zclip.steps == 12
    (logdir,) = event_dirs(str(tmp_path))
    scalars = read_scalars(logdir)
    assert sorted(scalars["grad_norm/body.0"]) == [0, 10]
    assert "grad_norm/head" in scalars and "grad_guard/clip/pre_norm" in scalars


# (what to break, the bad value, the field the message must name)
PARSER_REJECTS = [
    ("GradientAnomalyDetection", "on_nonfinite", "ignore"),
    ("GradientNormMonitor", "granularity", "layer"),
    ("GradientNormMonitor", "log_every_n_steps", "often"),
    ("GradientNormMonitor", "norm_type", "l2"),  # `float | Literal["inf"]`
]
CONSTRUCTOR_REJECTS = [
    ("GradientNormMonitor", "log_every_n_steps", 0),
    ("GradientAnomalyDetection", "vanishing_min_ratio", 2.0),
]


@pytest.mark.parametrize(("callback", "field", "value"), PARSER_REJECTS)
def test_parser_rejects_bad_yaml_value_naming_the_field(
    cli_main, tmp_path, capsys, callback, field, value
):
    path = _config_with(tmp_path, lambda c: _callback_args(c, callback).update({field: value}))
    with pytest.raises(SystemExit) as info:
        cli_main(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert f'Parser key "{field}"' in err
    assert f"grad_guard.{callback}" in err


@pytest.mark.parametrize(("callback", "field", "value"), CONSTRUCTOR_REJECTS)
def test_constructor_rejects_bad_yaml_value_naming_the_field(
    cli_main, tmp_path, callback, field, value
):
    path = _config_with(tmp_path, lambda c: _callback_args(c, callback).update({field: value}))
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        cli_main(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)


def test_nested_algorithm_values_are_checked(cli_main, tmp_path, capsys):
    path = _config_with(tmp_path, lambda c: _algorithm_args(c).update({"z_thresold": 2.0}))
    with pytest.raises(SystemExit):
        cli_main(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert "z_thresold" in capsys.readouterr().err  # the typo is named

    path = _config_with(tmp_path, lambda c: _algorithm_args(c).update({"z_threshold": -1.0}))
    with pytest.raises(ValueError, match=r"`z_threshold` must be a number > 0, got -1\.0"):
        cli_main(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)


def test_callbacks_and_nested_algorithm_from_the_command_line(cli_main, tmp_path):
    cli = cli_main(
        [
            "--trainer.callbacks+=grad_guard.GradientNormMonitor",
            "--trainer.callbacks.log_every_n_steps=3",
            "--trainer.callbacks+=grad_guard.GradientClipping",
            "--trainer.callbacks.algorithm=grad_guard.AutoClip",
            "--trainer.callbacks.algorithm.percentile=5",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    monitor, clipping = _ours(cli.trainer)
    assert isinstance(monitor, grad_guard.GradientNormMonitor) and monitor.log_every_n_steps == 3
    assert isinstance(clipping.algorithm, AutoClip) and clipping.algorithm.percentile == 5.0


def test_gradguard_parts_from_the_command_line(cli_main, tmp_path):
    cli = cli_main(
        [
            "--trainer.callbacks+=grad_guard.GradGuard",
            "--trainer.callbacks.clipping=grad_guard.AGC",
            "--trainer.callbacks.clipping.clip_factor=0.05",
            "--trainer.callbacks.detection=false",
            "--trainer.callbacks.report=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    (guard,) = _ours(cli.trainer)
    assert (
        isinstance(guard.clipping.algorithm, AGC) and guard.clipping.algorithm.clip_factor == 0.05
    )
    assert guard.detection is None and guard.report is False
    assert isinstance(guard.monitor, grad_guard.GradientNormMonitor)


def test_pytorch_lightning_cli_takes_the_twins(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["main.py"])
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    import grad_guard.pytorch_lightning as gg_pl

    class Module(pl.LightningModule):
        def __init__(self, hidden: int = 4) -> None:
            super().__init__()

    cli = LightningCLI(
        Module,
        run=False,
        args=[
            "--trainer.callbacks+=grad_guard.pytorch_lightning.GradientAnomalyDetection",
            "--trainer.callbacks.on_exploding=skip",
            "--trainer.callbacks+=grad_guard.pytorch_lightning.GradientClipping",
            "--trainer.callbacks.algorithm=grad_guard.ZClip",
            "--trainer.callbacks.algorithm.z_threshold=3",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    detection, clipping = _ours(cli.trainer)
    assert isinstance(detection, gg_pl.GradientAnomalyDetection)
    assert isinstance(detection, pl.Callback) and detection.on_exploding == "skip"
    assert isinstance(clipping.algorithm, ZClip) and clipping.algorithm.z_threshold == 3.0

    # the `lightning` class itself is refused by pytorch_lightning's parser: why the twins exist
    with pytest.raises(SystemExit):
        LightningCLI(
            Module,
            run=False,
            args=[
                "--trainer.callbacks+=grad_guard.GradientNormMonitor",
                f"--trainer.default_root_dir={tmp_path}",
            ],
        )
    assert "does not correspond to a subclass of Callback" in capsys.readouterr().err


def _public_classes() -> list[type]:
    names = [
        "GradientNormMonitor",
        "GradientAnomalyDetection",
        "GradientClipping",
        "GradGuard",
    ]
    return [getattr(grad_guard, n) for n in names] + [NormClip, ValueClip, AutoClip, ZClip, AGC]


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda c: c.__name__)
def test_every_constructor_argument_is_typed_for_the_parser(cls):
    hints = typing.get_type_hints(cls.__init__)
    parameters = [
        p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"
    ]
    untyped = [p.name for p in parameters if p.name not in hints or hints[p.name] is typing.Any]
    assert not untyped, f"{cls.__name__}: arguments the parser cannot check: {untyped}"

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "obj")
    required = {"max_norm": 1.0, "clip_value": 0.5}
    args = [f"--obj.{k}={v}" for k, v in required.items() if k in hints]
    config = parser.parse_args(args)
    assert {p.name for p in parameters} <= set(vars(config.obj))
    instance = parser.instantiate_classes(config).obj
    assert isinstance(instance, cls)
    copy.deepcopy(instance)  # Lightning deep-copies callbacks in some paths (e.g. tuner)
