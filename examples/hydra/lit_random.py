"""The model and data of the Hydra example: a deep MLP on random features (nothing grad_guard here).

Example:
    >>> data = RandomDataModule(samples=8, features=4, classes=2, batch_size=4)
    >>> x, y = next(iter(data.train_dataloader()))
    >>> tuple(x.shape), tuple(y.shape)
    ((4, 4), (4,))
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class DeepClassifier(L.LightningModule):
    """A deep MLP classifier trained with SGD.

    Args:
        features: input size.
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        classes: number of classes.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"`` (sigmoid makes the first layers'
            gradients vanish from a depth of about 10).
        lr: SGD learning rate.

    Raises:
        ValueError: if ``activation`` is not one of the three.
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
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, classes))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class RandomDataModule(L.LightningDataModule):
    """Random features with labels from a fixed random linear map (learnable, offline).

    Args:
        samples: number of training samples.
        features: input size.
        classes: number of classes.
        batch_size: batch size.
        seed: seed of the features and of the labelling map.
    """

    def __init__(
        self,
        samples: int = 256,
        features: int = 16,
        classes: int = 3,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, features, generator=generator)
        y = (x @ torch.randn(features, classes, generator=generator)).argmax(dim=1)
        self.dataset = TensorDataset(x, y)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)
