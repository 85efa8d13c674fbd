"""Small models, data and readers shared by the tests."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(
    n: int = 64, features: int = 4, classes: int = 2, batch_size: int = 8, seed: int = 0
):
    """A deterministic classification loader (no shuffling)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyModule(L.LightningModule):
    """An MLP classifier: layers ``net.0``, ``net.2``, ``net.4``."""

    def __init__(
        self,
        features: int = 4,
        hidden: int = 8,
        classes: int = 2,
        lr: float = 0.1,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(tmp_path: Any, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer logging to TensorBoard under ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def event_accumulator(log_dir: str) -> EventAccumulator:
    """Everything TensorBoard's own reader finds in ``log_dir`` (no sampling)."""
    accumulator = EventAccumulator(
        log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def read_scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` read back from the event files in ``log_dir``."""
    accumulator = event_accumulator(log_dir)
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def event_dirs(root: str) -> list[str]:
    """Folders under ``root`` that hold TensorBoard event files."""
    files = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})
