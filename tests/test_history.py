import io
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from grad_guard.history import GradientHistory
from grad_guard.report import run_reader


def _fill(history: GradientHistory, steps: int, layers=("a", "b", "c")) -> None:
    for step in range(steps):
        history.record(
            step,
            list(layers),
            [float(step + 1) * 10.0**-i for i in range(len(layers))],
            total_norm=float(step + 1),
            param_norms=[2.0] * len(layers),
        )


def test_memory_is_bounded_and_columns_stay_evenly_spread():
    history = GradientHistory(max_steps=16)
    _fill(history, 1000)
    assert 8 <= len(history) <= 16
    gaps = set(np.diff(history.steps).tolist())
    assert len(gaps) == 1  # evenly spaced after thinning
    assert history.steps[0] == 0
    assert history.matrix().shape == (3, len(history))
    assert history.records == 1000
    # exact aggregates see every record, also the thinned ones
    assert history.aggregates["a"].max == 1000.0
    assert history.aggregates["a"].min == 1.0
    assert history.aggregates["c"].last_grad_norm == pytest.approx(10.0)


def test_nonfinite_survives_decimation():
    history = GradientHistory(max_steps=4)
    for step in range(40):
        value = math.nan if step == 37 else 1.0
        history.record(step, ["a", "b"], [1.0, value])
    assert 37 not in history.steps
    grads = history.matrix().filled(0.0)
    assert np.isnan(grads[1]).sum() == 1
    assert not np.isnan(grads[0]).any()
    assert history.aggregates["b"].nonfinite == 1


def test_zero_and_no_grad_are_distinct():
    history = GradientHistory()
    for step in range(6):
        history.record(step, ["a", "b", "c"], [1.0, 0.0, 0.0], has_grad=[True, True, False])
    grads = history.matrix()
    assert not grads.mask[1].any() and (grads[1] == 0).all()  # zero: recorded
    assert grads.mask[2].all()  # no gradient: masked
    assert history.aggregates["b"].zero == 6 and history.aggregates["b"].no_grad == 0
    assert history.aggregates["c"].no_grad == 6 and history.aggregates["c"].dead_streak == 6
    history.record(6, ["a", "b", "c"], [1.0, 0.5, 0.5])
    assert history.aggregates["b"].dead_streak == 0


def test_update_ratios_attach_to_their_step_and_new_layers_are_padded():
    history = GradientHistory()
    history.record(0, ["a"], [1.0])
    history.record_update_ratios(0, ["a"], [1e-3])
    history.record(1, ["a", "late"], [1.0, 2.0])
    history.record_update_ratios(1, ["a", "late"], [2e-3, 3e-3])
    history.record_update_ratios(7, ["a"], [9.0])  # a step that was not recorded
    ratios = history.matrix("update_ratio")
    assert ratios[0].tolist() == [1e-3, 2e-3]
    assert ratios.mask[1].tolist() == [True, False]
    assert history.matrix().mask[1].tolist() == [True, False]
    assert history.aggregates["a"].last_update_ratio == 9.0
    with pytest.raises(ValueError, match="quantity"):
        history.matrix("nope")


def test_state_dict_round_trip_through_a_weights_only_checkpoint():
    history = GradientHistory(max_steps=8)
    _fill(history, 30)
    history.record(30, ["a", "b", "c"], [math.inf, 0.0, 1.0], has_grad=[True, True, False])
    history.update_counts({"nonfinite": 2, "skipped_steps": 1}, clipped_fraction=0.25)
    history.add_event({"step": 30, "kind": "nonfinite", "layers": ("a",), "values": (math.inf,)})
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    restored = GradientHistory()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.steps == history.steps and restored.layers == history.layers
    np.testing.assert_array_equal(restored.matrix().filled(-7), history.matrix().filled(-7))
    assert restored.counts["nonfinite"] == 2 and restored.clipped_fraction == 0.25
    assert restored.aggregates["a"].nonfinite == 1
    assert restored.events[0]["layers"] == ["a"]
    # keeps thinning at the same pace after a resume
    _fill(restored, 5)
    _fill(history, 5)
    assert restored.steps == history.steps


def test_events_are_bounded_and_accept_dataclasses():
    @dataclass(frozen=True)
    class Event:
        step: int
        kind: str
        layers: tuple
        values: tuple
        threshold: float | None
        action: str

    history = GradientHistory(max_events=3)
    for step in range(5):
        history.add_event(Event(step, "exploding", ("fc1",), (torch.tensor(9.0),), 1.0, "warn"))
    assert history.events_total == 5
    assert [e["step"] for e in history.events] == [2, 3, 4]
    assert history.events[0]["values"] == [9.0]


def test_invalid_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"max_steps.*got 1"):
        GradientHistory(max_steps=1)
    with pytest.raises(ValueError, match="max_events"):
        GradientHistory(max_events=-1)


def test_from_event_files_reads_grad_guard_tags_in_forward_order(tmp_path):
    run = tmp_path / "lightning_logs" / "version_0"
    layers = ["stem", "blocks.10", "blocks.9", "head"]  # not alphabetical
    with SummaryWriter(str(run)) as writer:
        writer.add_scalar("hp_metric", 0.0, 0)
        for step in range(0, 10, 2):
            writer.add_scalar("grad_guard/total_grad_norm", 5.0 + step, step)
            for i, name in enumerate(layers):
                if name == "blocks.9" and step == 4:
                    continue  # no gradient that step
                writer.add_scalar(f"grad_norm/{name}", 10.0**-i * (step + 1), step)
                writer.add_scalar(f"param_norm/{name}", 3.0, step)
                writer.add_scalar(f"update_ratio/{name}", 1e-3 * (i + 1), step)
        writer.add_scalar("grad_guard/skipped_steps", 3.0, 8)
        writer.add_scalar("grad_guard/anomalies/nonfinite", 1.0, 2)
        writer.add_scalar("grad_guard/anomalies/nonfinite", 4.0, 8)  # cumulative
        # clipped fraction is logged per interval: 0.5 of steps 0-1, 0.25 of steps 2-9
        writer.add_scalar("grad_guard/clip/clipped_fraction", 0.5, 1)
        writer.add_scalar("grad_guard/clip/clipped_fraction", 0.25, 9)
    history = GradientHistory.from_event_files(str(tmp_path))
    assert history.meta["run_dir"] == str(run)
    assert history.layers == layers
    assert history.steps == [0, 2, 4, 6, 8]
    grads = history.matrix()
    assert grads[0].tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert grads.mask[2].tolist() == [False, False, True, False, False]
    assert history.matrix("update_ratio")[3].tolist() == pytest.approx([4e-3] * 5)
    assert history.aggregates["head"].last_param_norm == 3.0
    assert history.total_norm_array().tolist() == [5.0, 7.0, 9.0, 11.0, 13.0]
    assert history.counts["skipped_steps"] == 3
    assert history.counts["nonfinite"] == 4
    assert history.clipped_fraction == pytest.approx(0.3)


def test_find_run_dir_without_event_files_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        run_reader.newest_run(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        run_reader.read_run(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        GradientHistory.from_event_files(str(tmp_path))


def test_event_file_reader_uses_the_loggers_tag_prefixes():
    from grad_guard import loggers

    assert (run_reader.GRAD_NORM, run_reader.PARAM_NORM, run_reader.UPDATE_RATIO) == (
        loggers.GRAD_NORM,
        loggers.PARAM_NORM,
        loggers.UPDATE_RATIO,
    )
    assert run_reader.SUMMARY == loggers.SUMMARY


def test_first_and_last_logged_step_are_exact_whatever_the_thinning():
    history = GradientHistory(max_steps=8)
    for step in range(3, 2000, 4):  # a 2000-step run logged every 4 steps, from step 3
        history.record(step, ["a"], [1.0])
    assert history.records == 500 and len(history) <= 8
    assert history.steps[-1] != 1999  # the kept columns do not end on the last step...
    assert (history.first_step, history.last_step) == (3, 1999)  # ...the range does
    restored = GradientHistory()
    restored.load_state_dict(history.state_dict())
    assert (restored.first_step, restored.last_step) == (3, 1999)
