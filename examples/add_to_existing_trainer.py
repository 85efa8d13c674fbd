"""Add grad_guard to an existing Lightning project in one line.

Run:  python examples/add_to_existing_trainer.py
Then: tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_guard import GradientNormMonitor


class Autoencoder(L.LightningModule):
    """A LightningModule you already have; nothing in it knows about grad_guard."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 32))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = nn.functional.mse_loss(self.decoder(self.encoder(x)), x)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=".", help="where lightning_logs/ goes")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    data = DataLoader(TensorDataset(torch.randn(512, 32)), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        max_steps=args.steps,
        default_root_dir=args.root,
        log_every_n_steps=5,
        accelerator="cpu",
        callbacks=[GradientNormMonitor()],  # <- the one line
    )
    trainer.fit(Autoencoder(), data)
    print(f"Logs written. Run: tensorboard --logdir {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
