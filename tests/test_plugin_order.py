"""Forward (input-first) layer order for the dashboard, whatever the data provider."""

from __future__ import annotations

import os
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from grad_guard.loggers import write_scalars
from grad_guard.tensorboard import order
from grad_guard.tensorboard.data import json_value, parse_events

FORWARD = ["zeta_in", "mid.10", "mid.2", "alpha_out"]  # sorts neither by name nor naturally


def write_run(folder: str, steps: int = 3) -> list[str]:
    writer = SummaryWriter(folder)
    for step in range(steps):
        write_scalars(writer, {f"grad_norm/{n}": float(step + 1) for n in FORWARD}, step)
    write_scalars(writer, {"grad_norm/late_layer": 1.0}, steps)  # appears on a later step
    writer.close()
    return [f"grad_norm/{n}" for n in [*FORWARD, "late_layer"]]


def test_written_order_is_the_order_of_the_first_event(tmp_path: Any) -> None:
    tags = write_run(str(tmp_path))
    assert order.written_order(str(tmp_path), sorted(tags)) == tags


def test_unknown_tags_come_last_in_natural_order(tmp_path: Any) -> None:
    tags = write_run(str(tmp_path))
    extra = ["grad_norm/x.10", "grad_norm/x.9"]
    got = order.written_order(str(tmp_path), [*extra, *tags])
    assert got == [*tags, "grad_norm/x.9", "grad_norm/x.10"]


def test_forward_order_without_files(tmp_path: Any) -> None:
    listed = ["b.10", "b.2", "a"]
    assert order.forward_order(listed, None, provider_ordered=True) == listed
    assert order.forward_order(listed, None, provider_ordered=False) == ["a", "b.2", "b.10"]
    assert order.forward_order(listed, str(tmp_path), provider_ordered=False) == [
        "a",
        "b.2",
        "b.10",
    ]


def test_run_directory_stays_on_local_disk(tmp_path: Any) -> None:
    os.makedirs(tmp_path / "run_a")
    assert order.run_directory(str(tmp_path), "run_a") == str(tmp_path / "run_a")
    assert order.run_directory(str(tmp_path), ".") == str(tmp_path)
    assert order.run_directory(str(tmp_path), "missing") is None
    assert order.run_directory("gs://bucket/logs", "run_a") is None
    assert order.run_directory("", "run_a") is None


def test_event_text_parsing() -> None:
    text = (
        "**exploding** at step 12 — action `skip`\n\n| layer | gradient norm |\n|---|---|\n"
        "| `fc` | 1e+04 |\n\nthreshold 100 (absolute limit)\n"
        "**loss_spike** at step 12 — action `warn`"
    )
    events = parse_events(text, step=12)
    assert [(e["step"], e["kind"], e["action"]) for e in events] == [
        (12, "exploding", "skip"),
        (12, "loss_spike", "warn"),
    ]
    assert "threshold 100" in events[0]["text"] and "threshold" not in events[1]["text"]
    assert parse_events("free text", step=4) == [
        {"step": 4, "kind": "unknown", "action": "", "text": "free text"}
    ]
    assert parse_events("", step=4) == []


def test_json_value_encodes_nonfinite_as_strings() -> None:
    assert json_value(1.5) == 1.5
    assert json_value(float("nan")) == "NaN"
    assert json_value(float("-inf")) == "-Infinity"
