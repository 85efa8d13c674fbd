"""Runs written with ``SummaryWriter`` directly, as grad_guard writes them (no training)."""

import json
import os

from torch.utils.tensorboard import SummaryWriter


def write_run(
    folder,
    steps=range(30),
    layers=("fc1", "fc2", "fc3", "head"),
    grad=lambda step, i: 10.0 ** (i - 3),
    total=lambda step: 1.0,
    config=None,
    events=(),
):
    """A grad_guard-style run: per-layer norms, the total, an optional config and events.

    Flushes after each step and returns ``(event file, {step: file size after that step})``.
    """
    sizes = {}
    with SummaryWriter(str(folder)) as writer:
        if config is not None:
            writer.add_text("grad_guard/config", json.dumps(config), 0)
        for step in steps:
            writer.add_scalar("grad_guard/total_grad_norm", total(step), step)
            for i, name in enumerate(layers):
                writer.add_scalar(f"grad_norm/{name}", grad(step, i), step)
            for event_step, text in events:
                if event_step == step:
                    writer.add_text("grad_guard/anomaly_events", text, step)
            writer.flush()
            sizes[step] = os.path.getsize(writer.file_writer.event_writer._file_name)
        path = writer.file_writer.event_writer._file_name
    return path, sizes


def flip(path, offset):
    """Invert the byte at ``offset`` of ``path``; returns the new content."""
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    data[offset] ^= 0xFF
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    return data
