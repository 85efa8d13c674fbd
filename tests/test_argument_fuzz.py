"""Table-driven fuzz of every public constructor and of the ``grad-guard`` command line.

Each constructor argument has a *kind* (a positive number, a count, a flag, regexes, an
action, an object of some type...) and each kind a list of values that must be refused:
bools where numbers are expected, numeric strings, NaN/inf, negatives, zero, wrong
containers, bad regexes, wrong object types. A refusal is a ``ValueError`` or
``TypeError`` whose message names the argument in backticks, shows the value given
(its repr) and says what is allowed ("must ...").

The signatures are read with ``inspect.signature``: an argument added to a public
constructor without a row here (or an exemption with its reason) fails
``test_every_argument_has_a_row``.

Rows of the classes in ``grad_guard.core.clip`` run in ``test_constructor_refuses``; rows
of the callbacks, the plain-loop guard and ``DetectionConfig`` (owned by the engine's
maintainer) in ``test_lead_owned_constructors``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

import grad_guard
from grad_guard import cli
from grad_guard.core.detect import DetectionConfig

NAN, INF = math.nan, math.inf
ACTIONS = ("skip", "rollback", "warn", "stop", "raise")
ALLOWED_ACTIONS = {  # DESIGN.md "Key arguments"
    "on_nonfinite": ACTIONS,
    "on_exploding": ACTIONS,
    "on_loss_spike": ACTIONS,
    "on_vanishing": ("warn", "stop", "raise"),
}

_COUNT = [True, False, "1", 1.0, 2.5, NAN, INF, -1, 0, None, [1]]
_POSITIVE = [True, False, "1.0", NAN, INF, -INF, -1.0, 0, 0.0, None, [1.0], 1j]
_NORM_TYPE = [True, False, "1.0", "2", "inf ", " inf", "fro", "nan", NAN, -1.0, 0, -INF, None]
_NORM_TYPE += [[2.0], 2j]
BAD: dict[str, list[Any]] = {
    "flag": ["false", "true", 1, 0, None, 1.0, "yes"],
    "positive": _POSITIVE,
    "positive_or_none": [v for v in _POSITIVE if v is not None],
    "count": _COUNT,
    "count_or_none": [v for v in _COUNT if v is not None],
    "count2": [*_COUNT, 1],
    "count0": [True, False, "1", 1.0, -1, NAN, None],
    "norm_type": _NORM_TYPE,
    "norm_type_or_none": [v for v in _NORM_TYPE if v is not None],
    "patterns": [{"net": 1}, 5, 1.5, True, "(", ["("], [5], ["net", None], {"net"}, b"net"],
    "action": ["ignore", "SKIP", "skip ", "", None, True, 1, ["skip"]],
    "granularity": ["modules", "", 0, -1, True, False, 1.5, "1", None, ["module"]],
    # activations belong to modules: one layer per parameter tensor makes no sense
    "granularity_module": ["parameter", "modules", 0, -1, True, 1.5, "1", None],
    "unit_interval": [True, "0.9", 0, 0.0, 1, 1.0, 1.5, -0.1, NAN, INF, None],
    "ratio_or_none": [True, "1e-5", 0, 1, 1.5, -1e-5, NAN, INF],
    "percentile": [True, "10", 0, -1, 100.5, 101, NAN, INF, None],
    "clip_option": ["adaptive", "MEAN", "", None, True, 0],
    "saturation": [True, "0.99", 0.4, 1.0, 1.5, -1, NAN, INF, None],
    "algorithm": ["zclip", "ZSCORE", 5, 1.5, None, True, {"name": "zscore"}],
    "clipping_or_none": ["zclip", "ZSCORE", 5, 1.5, {"name": "zscore"}],
    "model": [5, "net", None, True, torch.zeros(2), [nn.Linear(2, 2)]],
    "optimizer_or_none": ["sgd", 5, True, nn.Linear(2, 2), [torch.zeros(2)]],
    "writer": [5, "tb", True, 1.5],
    "path_or_none": [5, True, 1.5, ["logs"], b"logs", ""],
    "detection_config": ["yes", 1, 0, "true", {"spike_window": 8}],
    "lr_factor": [True, "0.5", 0, 0.0, 1.5, -0.5, NAN, INF, None],
    "rollback_config": ["yes", 1, True, {"snapshot_every_n_steps": 10}],
}
#: the kind of an argument, by name, for every class that has it
KIND_OF = {
    "norm_type": "norm_type",
    "granularity": "granularity",
    "include": "patterns",
    "exclude": "patterns",
    "log_every_n_steps": "count_or_none",
    "max_consecutive_skips": "count",
    "max_norm": "positive",
    "clip_value": "positive",
    "clip_factor": "positive",
    "eps": "positive",
    "z_threshold": "positive",
    "alpha": "unit_interval",
    "percentile": "percentile",
    "window": "count",
    "warmup_steps": "count",
    "clip_option": "clip_option",
    "per_parameter": "flag",
    "exclude_head": "flag",
    "max_total_norm": "positive_or_none",
    "spike_z_threshold": "positive_or_none",
    "vanishing_min_norm": "positive_or_none",
    "vanishing_min_ratio": "ratio_or_none",
    "spike_window": "count2",
    "spike_warmup_steps": "count2",
    "loss_z_threshold": "positive_or_none",
    "loss_window": "count2",
    "loss_warmup_steps": "count2",
    "vanishing_patience": "count",
    "max_events": "count0",
    "log_param_norms": "flag",
    "log_update_ratio": "flag",
    "fold_into_optimizer": "flag",
    "snapshot_every_n_steps": "count",
    "max_rollbacks": "count",
    "cooldown_steps": "count0",
    "lr_factor": "lr_factor",
    "rollback": "rollback_config",
    "histogram_every_n_steps": "count_or_none",
    "max_histogram_layers": "count",
    "histogram_bins": "count2",
    "image_every_n_steps": "count_or_none",
    "history_size": "count2",
    "report": "flag",
    "print_report": "flag",
    "report_dir": "path_or_none",
    "algorithm": "algorithm",
    "model": "model",
    "optimizer": "optimizer_or_none",
    "writer": "writer",
    "saturation_threshold": "saturation",
    **{name: "action" for name in ALLOWED_ACTIONS},
}
#: (class, argument) -> kind, where the class differs from KIND_OF
OVERRIDES = {
    ("ZClip", "max_norm"): "positive_or_none",
    ("GradientGuard", "log_every_n_steps"): "count",
    ("GradientGuard", "norm_type"): "norm_type_or_none",
    ("GradientGuard", "clipping"): "clipping_or_none",
    ("GradientGuard", "detection"): "detection_config",
    ("GradGuard", "clipping"): "clipping_or_none",
    ("ActivationMonitor", "granularity"): "granularity_module",
}
#: classes that are no constructor users call with options
EXEMPT_CLASSES = {
    "GradientStats": "the result of a statistics pass, built by grad_guard",
    "GuardStep": "the result of GradientGuard.step(), built by grad_guard",
    "GradientAnomalyError": "an exception carrying an AnomalyEvent, raised by grad_guard",
    "AnomalyEvent": "a record built by grad_guard",
}
REQUIRED = {
    "NormClip": {"max_norm": 1.0},
    "ValueClip": {"clip_value": 1.0},
    "GradientGuard": {"model": nn.Linear(2, 2)},
}


def _parts_kinds() -> None:
    """GradGuard's parts: True/False or an instance of that part (a wrong part is refused)."""
    monitor, detection = grad_guard.GradientNormMonitor, grad_guard.GradientAnomalyDetection
    wrong = {"monitor": detection, "detection": monitor, "activations": detection}
    for part in ("monitor", "detection", "activations"):
        BAD[f"{part}_part"] = ["yes", "false", 1, 0, 5, wrong[part]()]
        OVERRIDES[("GradGuard", part)] = f"{part}_part"
    BAD["clipping_or_none"].append(monitor())


_parts_kinds()


def public_classes() -> dict[str, type]:
    names = [n for n in grad_guard.__all__ if inspect.isclass(getattr(grad_guard, n, None))]
    classes = {name: getattr(grad_guard, name) for name in names}
    classes["DetectionConfig"] = DetectionConfig
    return {name: cls for name, cls in classes.items() if name not in EXEMPT_CLASSES}


def arguments(cls: type) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(cls).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def kind_of(name: str, argument: str) -> str | None:
    return OVERRIDES.get((name, argument), KIND_OF.get(argument))


def _mine(cls: type) -> bool:
    return cls.__module__.startswith("grad_guard.core.clip")


def _rows(mine: bool) -> list[Any]:
    rows = []
    for name, cls in public_classes().items():
        if _mine(cls) != mine:
            continue
        for param in arguments(cls):
            kind = kind_of(name, param.name)
            values = list(BAD.get(kind, [])) if kind else []
            if kind == "action" and param.name == "on_vanishing":
                values += ["skip", "rollback"]
            for i, value in enumerate(values):
                rows.append(pytest.param(name, param.name, value, id=f"{name}-{param.name}-{i}"))
    return rows


def _build(name: str, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases warn
        return public_classes()[name](**{**REQUIRED.get(name, {}), **kwargs})


def check_refused(name: str, argument: str, value: Any) -> None:
    try:
        built = _build(name, **{argument: value})
    except (ValueError, TypeError) as err:
        message = str(err)
    except Exception as err:  # the wrong exception is a failure with a reason
        pytest.fail(f"{name}({argument}={value!r}) raised {type(err).__name__}: {err}")
    else:
        stored = getattr(built, argument, "<not stored>")
        pytest.fail(f"{name}({argument}={value!r}) was accepted (stored as {stored!r})")
    assert f"`{argument}`" in message, f"the message does not name `{argument}`: {message}"
    assert repr(value) in message, f"the message does not show {value!r}: {message}"
    assert "must" in message, f"the message does not say what is allowed: {message}"


def test_every_argument_has_a_row() -> None:
    missing = [
        f"{name}({param.name})"
        for name, cls in public_classes().items()
        for param in arguments(cls)
        if kind_of(name, param.name) not in BAD
    ]
    assert not missing, f"constructor arguments without a fuzz row: {missing}"


def test_the_table_covers_the_clip_algorithms_and_the_callbacks() -> None:
    names = set(public_classes())
    expected = {"NormClip", "ValueClip", "AutoClip", "ZClip", "AGC", "DetectionConfig"}
    expected |= {"GradientNormMonitor", "GradientAnomalyDetection", "GradGuard", "GradientGuard"}
    assert expected <= names
    assert len(_rows(mine=True)) > 100 and len(_rows(mine=False)) > 300


@pytest.mark.parametrize(("name", "argument", "value"), _rows(mine=True))
def test_constructor_refuses(name: str, argument: str, value: Any) -> None:
    check_refused(name, argument, value)


@pytest.mark.parametrize(("name", "argument", "value"), _rows(mine=False))
def test_lead_owned_constructors(name: str, argument: str, value: Any) -> None:
    """The callbacks, GradientGuard and DetectionConfig: same table, same rules."""
    check_refused(name, argument, value)


ACCEPTED = [
    ("NormClip", {"max_norm": 1, "norm_type": "inf"}, {"max_norm": 1.0, "norm_type": INF}),
    ("NormClip", {"max_norm": np.float32(0.5), "norm_type": 1}, {"norm_type": 1.0}),
    ("ValueClip", {"clip_value": 2, "norm_type": INF}, {"clip_value": 2.0, "norm_type": INF}),
    ("AutoClip", {"percentile": 100, "window": np.int64(3)}, {"percentile": 100.0, "window": 3}),
    ("ZClip", {"max_norm": None, "alpha": 0.5, "warmup_steps": 1}, {"max_norm": None}),
    ("ZClip", {"clip_option": "mean", "norm_type": 0.5}, {"clip_option": "mean"}),
    ("AGC", {"exclude": ("head", "^embed")}, {"exclude": ("head", "^embed")}),
    ("AGC", {"exclude": "head", "exclude_head": False}, {"exclude_head": False}),
]
ACCEPTED_LEAD = [
    ("GradientNormMonitor", {"include": ["^net"], "exclude": "bias", "granularity": 2}, {}),
    ("GradientNormMonitor", {"norm_type": "inf", "log_every_n_steps": 1}, {"norm_type": INF}),
    ("GradientGuard", {"model": nn.Linear(2, 2), "norm_type": None, "clipping": None}, {}),
    ("GradGuard", {"report_dir": "logs", "clipping": None}, {"report_dir": "logs"}),
    ("GradGuard", {"clipping": False}, {}),
    ("GradGuard", {"clipping": "agc"}, {}),
    *[
        ("GradientAnomalyDetection", {arg: action}, {arg: action})
        for arg, actions in ALLOWED_ACTIONS.items()
        for action in actions
    ],
]


def _accepted_id(row: tuple[str, dict, dict]) -> str:
    return row[0] + "-" + ",".join(f"{k}={v!r}" for k, v in row[1].items())


def check_accepted(name: str, kwargs: dict[str, Any], stored: dict[str, Any]) -> None:
    if name not in public_classes():
        pytest.fail(f"{name} is not public")
    params = {p.name for p in arguments(public_classes()[name])}
    missing = set(kwargs) - params
    assert not missing, f"{name} has no argument {sorted(missing)}"
    built = _build(name, **kwargs)
    for attribute, value in stored.items():
        got = getattr(built, attribute)
        assert got == value and type(got) is type(value), f"{attribute}: {got!r} != {value!r}"


@pytest.mark.parametrize(("name", "kwargs", "stored"), ACCEPTED, ids=map(_accepted_id, ACCEPTED))
def test_valid_values_accepted(name: str, kwargs: dict, stored: dict) -> None:
    check_accepted(name, kwargs, stored)


@pytest.mark.parametrize(
    ("name", "kwargs", "stored"), ACCEPTED_LEAD, ids=map(_accepted_id, ACCEPTED_LEAD)
)
def test_lead_owned_constructors_accept(name: str, kwargs: dict, stored: dict) -> None:
    check_accepted(name, kwargs, stored)


# --------------------------------------------------------------------------- command line

REPORT_BAD = {
    "--window": ["0", "-1", "1.5", "abc", "nan", "true"],
    "--max-rows": ["-1", "1.5", "abc", "nan"],
    "--precision": ["bogus", "", "16mixed"],
}
DEMO_BAD = {
    "--steps": ["0", "-1", "1.5", "abc", "nan"],
    "--depth": ["1", "0", "1.5", "abc"],
    "--seed": ["-1", "1.5", "abc"],
    "--seeds": ["0", "-1", "1.5", "abc"],
    "--jobs": ["0", "-1", "1.5", "abc"],
}
CLI_EXEMPT = {
    "--version": "a flag",
    "--help": "a flag",
    "--out": "any path; a write failure is reported when writing (test_cli_report)",
    "--quick": "a flag",
    "--no-progress": "a flag",
    "--overwrite": "a flag",
}


def _cli_commands() -> dict[str, Any]:
    """``grad-guard``'s sub-parsers by name, and the demo's own parser as ``demo.parser``."""
    build = getattr(cli, "parser", None) or cli._parser
    commands = {}
    for action in build()._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    import grad_guard.demo as demo

    if callable(getattr(demo, "parser", None)):
        commands["demo.parser"] = demo.parser()
    return commands


def _options(parser: Any) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")}


def test_every_cli_option_has_a_row() -> None:
    commands = _cli_commands()
    assert {"report", "demo"} <= set(commands), sorted(commands)
    for command, parser in commands.items():
        table = REPORT_BAD if command == "report" else DEMO_BAD
        missing = _options(parser) - set(table) - set(CLI_EXEMPT)
        assert not missing, f"{command}: options without a fuzz row: {sorted(missing)}"


def _run_cli(argv: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str]:
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"training started: {argv} was not refused")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return int(code), capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"), [(o, v) for o, values in REPORT_BAD.items() for v in values]
)
def test_report_option_refused(option: str, value: str, tmp_path, capsys, monkeypatch) -> None:
    code, err = _run_cli(["report", str(tmp_path), option, value], capsys, monkeypatch)
    assert code == 2, (code, err)
    assert option in err and repr(value) in err, err


@pytest.mark.parametrize(("option", "value"), [(o, v) for o, vs in DEMO_BAD.items() for v in vs])
def test_demo_option_refused(option: str, value: str, tmp_path, capsys, monkeypatch) -> None:
    argv = ["demo", "--out", str(tmp_path), "--no-progress", option, value]
    code, err = _run_cli(argv, capsys, monkeypatch)
    assert code == 2, (code, err)
    assert option in err and repr(value) in err, err


def test_report_logdir_missing(tmp_path, capsys, monkeypatch) -> None:
    missing = str(tmp_path / "nope")
    code, err = _run_cli(["report", missing], capsys, monkeypatch)
    assert code == 2 and repr(missing) in err, err
