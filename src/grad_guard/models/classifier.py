"""A minimal LightningModule that trains any classifier with cross-entropy.

This is the only file of :mod:`grad_guard.models` that imports Lightning;
``grad_guard.models.ImageClassifier`` loads it on first use.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from grad_guard._validation import check_float, check_int
from grad_guard.models.init import validate_choice

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


def _infer_num_classes(model: nn.Module) -> int:
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(
            "`num_classes` must be an int >= 2, or None to read it from the model's last "
            "nn.Linear, but the model has no nn.Linear; got None"
        )
    return last.out_features


class ImageClassifier(pl.LightningModule):
    """Wrap a classifier ``model`` for training with :class:`lightning.pytorch.Trainer`.

    Batches are ``(inputs, targets)`` with integer class targets. Each training step
    logs ``train_loss`` (cross-entropy) and ``train_acc`` (``torchmetrics`` multiclass
    accuracy); validation and test steps log ``val_*`` and ``test_*`` likewise. A
    non-finite loss is logged and returned as is: detecting and handling it is what
    grad_guard's callbacks are for.

    Args:
        model: any ``nn.Module`` mapping inputs to ``(N, num_classes)`` logits.
        lr: learning rate (> 0).
        momentum: SGD momentum in ``[0, 1)``; ignored by Adam.
        optimizer: ``"sgd"`` or ``"adam"``.
        weight_decay: L2 penalty (>= 0).
        num_classes: number of classes; ``None`` reads ``out_features`` of the model's
            last ``nn.Linear``.

    Raises:
        ValueError: if an argument is out of range, not an allowed name, or
            ``num_classes`` cannot be inferred.

    Example:
        >>> from grad_guard.models import DeepMLP
        >>> module = ImageClassifier(DeepMLP(64, 10, depth=3), lr=0.05, momentum=0.9)
        >>> optimizer = module.configure_optimizers()
        >>> type(optimizer).__name__, optimizer.defaults["lr"], optimizer.defaults["momentum"]
        ('SGD', 0.05, 0.9)
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.0,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        check_float("lr", lr)
        check_float("momentum", momentum, 0.0, 1.0, inclusive_min=True, inclusive_max=False)
        validate_choice("optimizer", optimizer, OPTIMIZERS)
        check_float("weight_decay", weight_decay, 0.0, inclusive_min=True)
        if num_classes is None:
            num_classes = _infer_num_classes(model)
        check_int("num_classes", num_classes, 2)

        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.optimizer_name = optimizer
        self.weight_decay = float(weight_decay)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        self.log(f"{stage}_acc", metric, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
