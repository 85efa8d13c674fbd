"""A LightningModule and a DataModule for the LightningCLI example (nothing grad_guard here)."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DeepClassifier(L.LightningModule):
    """A deep MLP classifier: the kind of network whose gradients grad_guard watches.

    Args:
        features: input size.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        classes: number of classes.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"`` (sigmoid makes early layers
            vanish at depth 10 or more).
        lr: SGD learning rate.
    """

    def __init__(
        self,
        features: int = 16,
        hidden: int = 32,
        depth: int = 4,
        classes: int = 3,
        activation: Literal["relu", "tanh", "sigmoid"] = "relu",
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        layers: list[nn.Module] = []
        width = features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class SyntheticData(L.LightningDataModule):
    """Gaussian blobs, one per class.

    Args:
        samples: number of training samples.
        features: input size (must match the model's).
        classes: number of classes (must match the model's).
        batch_size: batch size.
        seed: seed of the generated data.
    """

    def __init__(
        self,
        samples: int = 512,
        features: int = 16,
        classes: int = 3,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.samples, self.features, self.classes = samples, features, classes
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        centers = 3 * torch.randn(self.classes, self.features, generator=generator)
        y = torch.randint(0, self.classes, (self.samples,), generator=generator)
        x = centers[y] + torch.randn(self.samples, self.features, generator=generator)
        self.dataset = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)
