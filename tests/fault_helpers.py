"""Tiny models, fault injectors and a weight recorder for tests/test_fault_injection.py."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_guard import GradGuard, GradientAnomalyDetection

STEPS = 8
FAULT_STEP = 3  # the optimizer step (batch index without accumulation) that gets the fault
LAYERS = ("fc1", "fc2", "fc3")


def loader(n: int = STEPS * 4, batch: int = 4, seed: int = 0, ints: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 10, (n, 3), generator=g) if ints else torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 2, (n,), generator=g)), batch_size=batch)


class Net(pl.LightningModule):
    """``fc1 -> fc2 -> fc3``; ``fault(self, batch_idx)`` may poison the loss or a parameter."""

    def __init__(self, fault: Callable[..., Any] | None = None, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.fault, self.lr = fault, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.fault is not None:
            loss = self.fault(self, batch_idx, loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


class Recorder(pl.Callback):
    """Weights (all trainable tensors of every optimizer) before the fit and after each batch."""

    def __init__(self) -> None:
        self.snapshots: list[list[torch.Tensor]] = []

    def _take(self, trainer: pl.Trainer) -> None:
        tensors = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        self.snapshots.append([t.detach().clone() for t in tensors])

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._take(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._take(trainer)

    def unchanged(self, batch: int) -> bool:
        """Whether batch ``batch`` left every weight bit-identical."""
        before, after = self.snapshots[batch], self.snapshots[batch + 1]
        return all(torch.equal(a, b) for a, b in zip(before, after))

    def finite(self) -> bool:
        return all(torch.isfinite(t).all() for t in self.snapshots[-1])


class GradFault(pl.Callback):
    """After backward of micro-batch ``batch``, overwrite one gradient element (or scale)."""

    def __init__(self, batch: int, value: float, param: str = "fc2.weight", scale: bool = False):
        self.batch, self.value, self.param, self.scale = batch, value, param, scale
        self.seen = -1

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.seen += 1
        if self.seen != self.batch:
            return
        grad = dict(pl_module.named_parameters())[self.param].grad
        with torch.no_grad():
            if self.scale:
                grad.mul_(self.value)
            else:
                grad.view(-1)[0] = self.value


def nan_loss(step: int) -> Callable[..., torch.Tensor]:
    return lambda module, batch_idx, loss: loss * math.nan if batch_idx == step else loss


class PoisonParameter(pl.Callback):
    """Before batch ``batch``, one element of parameter ``name`` itself becomes NaN."""

    def __init__(self, batch: int, name: str = "fc2.weight") -> None:
        self.batch, self.name = batch, name

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.batch:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.name].view(-1)[0] = math.nan


class RaisingLogger(Logger):
    """A logger whose ``log_metrics`` always raises (a full disk, a dead W&B connection)."""

    name, version = "raising", 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        raise OSError(28, "No space left on device")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class _ReadOnlyWriter:
    """A ``SummaryWriter`` whose every ``add_*`` fails as writing a read-only file does."""

    def __getattr__(self, name: str) -> Any:
        def write(*args: Any, **kwargs: Any) -> None:
            if name.startswith("add_"):
                raise PermissionError(13, "Permission denied", "events.out.tfevents")

        return write


class ReadOnlyTensorBoardLogger(TensorBoardLogger):
    """TensorBoard over a log directory that cannot be written (as root, chmod is ignored).

    Lightning's own writes (hparams.yaml) are left out: they would fail without grad_guard.
    """

    @property
    def experiment(self) -> Any:
        return _ReadOnlyWriter()

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def save(self) -> None:
        pass


def fit(
    module: pl.LightningModule,
    guard: Any,
    tmp_path: Any,
    callbacks: tuple[pl.Callback, ...] = (),
    data: DataLoader | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, Recorder]:
    recorder = Recorder()
    options = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(str(tmp_path), name="run"),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(tmp_path),
    }
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[*callbacks, guard, recorder], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data if data is not None else loader())
    return trainer, recorder


def guard_for(**detection: Any) -> GradGuard:
    options = {"on_nonfinite": "skip", "spike_z_threshold": None, **detection}
    return GradGuard(detection=GradientAnomalyDetection(**options), clipping=None, report=False)


def amp16() -> Any:
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


class ExtraParameterNet(Net):
    """The optimizer also steps a tensor the module does not own."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.zeros(8, requires_grad=True)  # not an nn.Parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)) + self.extra)))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([*self.parameters(), self.extra], lr=0.1, momentum=0.9)


class ExtraGradFault(pl.Callback):
    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step == FAULT_STEP:
            pl_module.extra.grad[0] = math.nan


class SparseNet(pl.LightningModule):
    """``emb`` (sparse gradients) -> ``fc``."""

    def __init__(self, complex_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=True)
        self.fc = nn.Linear(4, 2)
        self.complex_head = complex_head
        if complex_head:
            self.rot = nn.Parameter(torch.randn(4, 4, dtype=torch.cfloat))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.emb(x).mean(1)
        if self.complex_head:
            h = (h.to(torch.cfloat) @ self.rot).abs()
        return nn.functional.cross_entropy(self.fc(h), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SparseGradFault(pl.Callback):
    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_step == FAULT_STEP:
            grad = pl_module.emb.weight.grad.coalesce()
            values = grad.values().clone()
            values.view(-1)[0] = math.nan
            pl_module.emb.weight.grad = torch.sparse_coo_tensor(grad.indices(), values, grad.shape)


class RankReport(pl.Callback):
    """Writes what the guard saw on this rank, so the parent can check every rank."""

    def __init__(self, out: str, guard: GradGuard) -> None:
        self.out, self.guard = out, guard

    def on_after_backward(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == FAULT_STEP:
            pl_module.fc2.weight.grad[0, 0] = math.nan  # after the all-reduce: rank 1 only

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        weights = [p.detach().double().sum().item() for p in pl_module.parameters()]
        report = {"counts": self.guard.detection.counts, "weights": weights}
        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(report, f)


class TwoOptimizerNet(Net):
    """Manual optimization: ``opt_a`` steps ``fc1``, ``opt_b`` steps ``fc2`` and ``fc3``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        if batch_idx == FAULT_STEP:
            self.fc1.weight.grad[0, 0] = math.nan
        opt_a.step()
        opt_b.step()

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.fc1.parameters(), lr=0.1, momentum=0.9),
            torch.optim.SGD([*self.fc2.parameters(), *self.fc3.parameters()], lr=0.1),
        )
