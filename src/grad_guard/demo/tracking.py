"""The runner's own callback (loss and raw gradient norm per step) and a quiet Lightning."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer

# Lightning's advice for real workloads; irrelevant for an in-memory toy dataset
_NOISY_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
    ".*Starting from v1\\.9\\.0, `tensorboardX` has been removed.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # Lightning 2.6 on torch 2.13
)
_NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
)


class RunTracker(Callback):
    """Records every step's loss and total gradient norm; stops a run that stayed NaN.

    It is placed first among the callbacks, so the norm it records in
    ``on_before_optimizer_step`` is the raw one, before any callback or Lightning clips.
    """

    def __init__(self, stop_after_nonfinite: int | None) -> None:
        self.stop_after_nonfinite = stop_after_nonfinite
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.diverged_at: int | None = None
        self.nonfinite_steps = 0
        self._streak = 0
        self._computer: GradientStatsComputer | None = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._computer is None:
            self._computer = GradientStatsComputer(group_parameters(pl_module))
        self.grad_norms.append(float(self._computer().total_norm))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, Tensor) else math.nan
        step = len(self.losses)
        self.losses.append(value)
        if math.isfinite(value):
            self._streak = 0
            return
        self.nonfinite_steps += 1
        self._streak += 1
        if self.diverged_at is None:
            self.diverged_at = step
        if self.stop_after_nonfinite is not None and self._streak >= self.stop_after_nonfinite:
            trainer.should_stop = True


@contextmanager
def quiet_lightning(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
