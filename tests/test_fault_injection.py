"""Fault injection: a table of faults run through short real ``Trainer.fit`` runs on CPU.

Each row trains a tiny model for a few steps with ``GradGuard`` watching, injects one
fault (a NaN/Inf gradient element, a NaN loss, a x1e6 gradient, a poisoned parameter, a
logger that raises...) and checks what a user relies on, through the public API only
(``GradGuard``, ``GradientAnomalyDetection``, ``counts``, ``events``):

* the fault is detected (``counts``, ``events``) and the right layer or parameter named;
* the weights are bit-identical across every step that was skipped, and finite;
* training goes on to the last step (or stops cleanly where that is the contract).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from fault_helpers import (
    FAULT_STEP,
    LAYERS,
    STEPS,
    ExtraGradFault,
    ExtraParameterNet,
    GradFault,
    Net,
    PoisonParameter,
    RaisingLogger,
    RankReport,
    ReadOnlyTensorBoardLogger,
    Recorder,
    SparseGradFault,
    SparseNet,
    TwoOptimizerNet,
    amp16,
    fit,
    guard_for,
    loader,
    nan_loss,
)
from grad_guard import AGC, GradGuard, GradientAnomalyDetection, ValueClip


@dataclass
class Fault:
    """One row: the fault, the run, and what must be seen."""

    callbacks: Callable[[], tuple[pl.Callback, ...]] = tuple
    module_fault: Callable[..., Any] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    kind: str | None = "nonfinite"  # expected in counts; None: nothing may be detected
    layer: str | None = "fc2"  # expected in an event's layers
    skipped: tuple[int, ...] = (FAULT_STEP,)  # batches whose weights must not move
    logger: Callable[[Any], Any] | None = None
    others_move: bool = True  # every other optimizer step changes the weights


FAULTS = {
    "nan_grad": Fault(lambda: (GradFault(FAULT_STEP, math.nan),)),
    "posinf_grad": Fault(lambda: (GradFault(FAULT_STEP, math.inf),)),
    "neginf_grad": Fault(lambda: (GradFault(FAULT_STEP, -math.inf),)),
    "nan_first_layer": Fault(lambda: (GradFault(FAULT_STEP, math.nan, "fc1.bias"),), layer="fc1"),
    "nan_loss": Fault(module_fault=nan_loss(FAULT_STEP), layer="fc3"),
    # micro-batch 6 is in the second window of 4: optimizer step 1 = batches 4..7
    "accumulate_4": Fault(
        lambda: (GradFault(6, math.nan),),
        trainer={"accumulate_grad_batches": 4, "max_steps": 3},
        skipped=(4, 5, 6, 7),
        others_move=False,  # micro-batches move nothing
    ),
    "bf16_mixed_nan": Fault(
        lambda: (GradFault(FAULT_STEP, math.nan),), trainer={"precision": "bf16-mixed"}
    ),
    "amp16_scaler_inf": Fault(
        lambda: (GradFault(FAULT_STEP, math.inf),),
        trainer={"plugins": [amp16()]},
        kind="amp_overflow",
        layer=None,
        others_move=False,  # the scaler also skips its own early overflows
    ),
    "x1e6_grad": Fault(
        lambda: (GradFault(6, 1e6, scale=True),),
        detection={
            "spike_z_threshold": 4.0,
            "spike_window": 8,
            "spike_warmup_steps": 4,
            "on_exploding": "skip",
        },
        kind="exploding",
        skipped=(6,),
    ),
    "x1e6_grad_max_total_norm": Fault(
        lambda: (GradFault(FAULT_STEP, 1e6, scale=True),),
        detection={"max_total_norm": 1e3, "on_exploding": "skip"},
        kind="exploding",
    ),
    "zero_grads": Fault(
        lambda: (GradFault(FAULT_STEP, 0.0, scale=True),), kind=None, layer=None, skipped=()
    ),
    "logger_raises": Fault(
        lambda: (GradFault(FAULT_STEP, math.nan),), logger=lambda tmp: RaisingLogger()
    ),
    "readonly_logdir": Fault(
        lambda: (GradFault(FAULT_STEP, math.nan),),
        logger=lambda tmp: ReadOnlyTensorBoardLogger(str(tmp), name="ro"),
    ),
}


@pytest.mark.parametrize("case", FAULTS.values(), ids=FAULTS.keys())
def test_fault(case: Fault, tmp_path: Any) -> None:
    guard = guard_for(**case.detection)
    trainer_kwargs = dict(case.trainer)
    if case.logger is not None:
        trainer_kwargs["logger"] = case.logger(tmp_path)
    trainer, recorder = fit(
        Net(case.module_fault), guard, tmp_path, case.callbacks(), **trainer_kwargs
    )
    detection = guard.detection
    assert trainer.global_step == trainer_kwargs.get("max_steps", STEPS), "training stopped early"
    assert recorder.finite(), "non-finite weights after the run"
    if case.kind is None:
        assert not any(detection.counts.get(k, 0) for k in ("nonfinite", "exploding")), (
            detection.counts
        )
        assert all(e.kind not in ("nonfinite", "exploding") for e in detection.events)
    else:
        assert detection.counts.get(case.kind, 0) >= 1, detection.counts
    if case.layer is not None:
        layers = {name for e in detection.events if e.kind == case.kind for name in e.layers}
        assert case.layer in layers, f"{case.layer} not named: {detection.events}"
    for batch in case.skipped:
        assert recorder.unchanged(batch), f"weights moved on skipped batch {batch}"
    if case.others_move:
        frozen = [
            b
            for b in range(len(recorder.snapshots) - 1)
            if b not in case.skipped and recorder.unchanged(b)
        ]
        assert not frozen, f"healthy batches {frozen} did not move the weights"


# --------------------------------------------------------------------------- the holes


ERROR_FILTERS = {
    # -W error / pytest filterwarnings=error: every warning raises (Lightning's noise aside)
    "all_warnings": "",
    # only the anomaly warning raises: grad_guard must not swallow it and apply the step
    "anomaly_warning_only": "grad_guard: non-finite",
}


@pytest.mark.parametrize("pattern", ERROR_FILTERS.values(), ids=ERROR_FILTERS.keys())
def test_warnings_as_errors_still_skip(pattern: str, tmp_path: Any) -> None:
    """The skip is applied and counted before the anomaly warning can raise."""
    guard, recorder, module = guard_for(), Recorder(), Net()
    trainer = pl.Trainer(
        callbacks=[GradFault(FAULT_STEP, math.nan), guard, recorder],
        max_steps=STEPS,
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        if pattern:
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", message=pattern)
        else:
            warnings.simplefilter("error")
            for noise in (".*does not have many workers.*", ".*GPU available.*", ".*litlogger.*"):
                warnings.filterwarnings("ignore", message=noise)
            for category in (FutureWarning, DeprecationWarning, PossibleUserWarning):
                warnings.filterwarnings("ignore", category=category)  # Lightning's own
        # the user asked for warnings to be errors: fit may end there, but not with the NaN
        with contextlib.suppress(Warning):
            trainer.fit(module, loader())
    before = recorder.snapshots[FAULT_STEP]
    if len(recorder.snapshots) > FAULT_STEP + 1:
        after = recorder.snapshots[FAULT_STEP + 1]
    else:  # the fit ended inside the faulty step
        after = [p.detach() for p in module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the NaN step was applied"
    assert all(torch.isfinite(p).all() for p in module.parameters()), "NaN in the weights"
    assert guard.detection.counts["nonfinite"] >= 1, guard.detection.counts
    assert guard.detection.counts["skipped_steps"] >= 1, guard.detection.counts


def test_parameter_outside_the_module_is_watched(tmp_path: Any) -> None:
    guard = guard_for()
    module = ExtraParameterNet()
    trainer, recorder = fit(module, guard, tmp_path, (ExtraGradFault(),))
    assert guard.detection.counts["nonfinite"] == 1, guard.detection.counts
    named = {name for e in guard.detection.events for name in e.layers}
    assert named - set(LAYERS), f"the extra tensor has no layer of its own: {named}"
    assert recorder.unchanged(FAULT_STEP)
    assert torch.isfinite(module.extra).all() and trainer.global_step == STEPS


def test_sparse_gradient_nan_detected(tmp_path: Any) -> None:
    guard = guard_for(vanishing_patience=2)
    trainer, recorder = fit(
        SparseNet(), guard, tmp_path, (SparseGradFault(),), data=loader(ints=True)
    )
    events = guard.detection.events
    assert guard.detection.counts["nonfinite"] == 1, guard.detection.counts
    assert any("emb" in e.layers for e in events if e.kind == "nonfinite"), events
    assert recorder.unchanged(FAULT_STEP) and recorder.finite()
    assert not [e for e in events if e.kind == "vanishing"], "false vanishing events"
    assert trainer.global_step == STEPS


CLIPPER_FAILURES = {
    "agc_sparse": (lambda: AGC(), False),
    "valueclip_sparse": (lambda: ValueClip(clip_value=0.5), False),
    "valueclip_complex": (lambda: ValueClip(clip_value=0.5), True),
}


@pytest.mark.parametrize("case", CLIPPER_FAILURES.values(), ids=CLIPPER_FAILURES.keys())
def test_clipper_failure_does_not_kill_fit(case: Any, tmp_path: Any) -> None:
    """Refused at setup with a message naming the problem, or handled: never a crash mid-fit."""
    algorithm, complex_head = case
    guard = GradGuard(clipping=algorithm(), report=False)
    module = SparseNet(complex_head=complex_head)
    started = []
    probe = pl.Callback()
    probe.on_before_optimizer_step = lambda *args: started.append(1)  # type: ignore[method-assign]
    try:
        trainer, recorder = fit(module, guard, tmp_path, (probe,), data=loader(ints=True))
    except (ValueError, TypeError) as err:
        assert not started, f"refused mid-fit, not at setup: {err}"
        assert type(guard.clipping.algorithm).__name__ in str(err), str(err)
        assert "sparse" in str(err) or "complex" in str(err), str(err)
    else:
        assert trainer.global_step == STEPS and recorder.finite()


def _callbacks() -> dict[str, Callable[[], Any]]:
    import grad_guard

    return {
        "GradGuard": GradGuard,
        "GradientAnomalyDetection": GradientAnomalyDetection,
        "GradientNormMonitor": grad_guard.GradientNormMonitor,
        "GradGuard_agc": lambda: GradGuard(clipping=AGC()),
        "GradGuard_autoclip": lambda: GradGuard(clipping="autoclip"),
    }


@pytest.mark.parametrize("name", _callbacks())
def test_callbacks_pickle(name: str, tmp_path: Any) -> None:
    callback = _callbacks()[name]()
    pickle.loads(pickle.dumps(callback))
    fit(Net(), callback, tmp_path, max_steps=2)  # after a fit too (a second ddp_spawn fit)
    pickle.loads(pickle.dumps(callback))
    copy.deepcopy(callback)


@pytest.mark.distributed
def test_ddp_spawn_fit(tmp_path: Any) -> None:
    guard = guard_for()
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        callbacks=[RankReport(str(tmp_path), guard), guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), loader())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["counts"]["nonfinite"] for r in ranks] == [1, 1], ranks
    assert ranks[0]["weights"] == ranks[1]["weights"], "the ranks diverged"
    assert all(math.isfinite(w) for w in ranks[0]["weights"])


def test_resume_with_changed_options_keeps_state(tmp_path: Any) -> None:
    """``max_epochs`` cuts (exact resume); the second run changes detection and clipping."""
    data = loader()  # 8 batches per epoch
    first = GradGuard(
        detection=GradientAnomalyDetection(max_consecutive_skips=10), clipping=None, report=False
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(
        Net(),
        first,
        tmp_path,
        (GradFault(FAULT_STEP, math.nan), ckpt),
        data=data,
        max_steps=-1,
        max_epochs=1,
        enable_checkpointing=True,
    )
    assert first.detection.counts["nonfinite"] == 1
    logged = len(first.monitor.history)

    second = GradGuard(
        detection=GradientAnomalyDetection(max_consecutive_skips=20, spike_z_threshold=5.0),
        clipping="autoclip",
        log_every_n_steps=2,
        report=False,
    )
    trainer = pl.Trainer(
        callbacks=[second],
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.detection.counts["nonfinite"] == 1, second.detection.counts
    assert [e.step for e in second.detection.events if e.kind == "nonfinite"] == [FAULT_STEP]
    assert len(second.monitor.history) > logged, "the monitor history was reset"


def test_nonfinite_parameter_is_named(tmp_path: Any) -> None:
    guard = guard_for()
    fit(Net(), guard, tmp_path, (PoisonParameter(FAULT_STEP),))
    messages = [e.message() for e in guard.detection.events if e.kind == "nonfinite"]
    assert messages, guard.detection.counts
    assert any("parameter `fc2.weight` is non-finite" in m for m in messages), messages


def test_manual_optimization_two_optimizers(tmp_path: Any) -> None:
    guard = guard_for()
    module = TwoOptimizerNet()
    _, recorder = fit(module, guard, tmp_path, max_steps=2 * STEPS)
    assert guard.detection.counts["nonfinite"] == 1, guard.detection.counts
    events = [e for e in guard.detection.events if e.kind == "nonfinite"]
    assert events and set(events[0].layers) == {"fc1"}, events
    before, after = recorder.snapshots[FAULT_STEP], recorder.snapshots[FAULT_STEP + 1]
    assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2])), "fc1 moved"
    assert not all(torch.equal(a, b) for a, b in zip(before[2:], after[2:])), "opt_b skipped too"
    assert recorder.finite()
