"""grad_guard in a Lightning Fabric loop: ``GradientGuard`` between backward and step.

Run:  python examples/fabric_loop.py --root runs/fabric
Then: tensorboard --logdir runs/fabric

Fabric wraps the model and the optimizer; the guard unwraps the model, so the layer
names are the plain model's (``encoder.0``, not ``_forward_module.encoder.0``). With
``precision="16-mixed"`` on a GPU the gradients are still loss-scaled at this point
(Fabric unscales inside ``optimizer.step()``): use ``"bf16-mixed"`` or ``"32-true"``
for true norms.
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from grad_guard import AutoClip
from grad_guard.loop import GradientGuard


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def main(argv: list[str] | None = None) -> GradientGuard:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="runs/fabric", help="TensorBoard log folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args(argv)

    fabric = Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(args.root))
    fabric.seed_everything(0)
    model = Autoencoder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(
        DataLoader(TensorDataset(torch.randn(256, 32)), batch_size=32, shuffle=True)
    )
    guard = GradientGuard(
        model,
        optimizer,
        clipping=AutoClip(percentile=10.0),
        writer=fabric.logger.experiment,  # a SummaryWriter on rank 0, a no-op elsewhere
        log_every_n_steps=args.log_every,
    )

    step = 0
    for _ in range(args.epochs):
        for (x,) in loader:
            loss = nn.functional.mse_loss(model(x), x)
            optimizer.zero_grad()
            fabric.backward(loss)
            result = guard.step(step)  # <- between backward() and optimizer.step()
            if result.should_step:
                optimizer.step()
            fabric.log("loss", loss.item(), step=step)
            step += 1

    guard.flush()
    fabric.logger.finalize("success")
    fabric.print(f"layers: {guard.layer_names}; anomalies: {guard.counts}")
    fabric.print(f"Run: tensorboard --logdir {fabric.logger.log_dir}")
    return guard


if __name__ == "__main__":
    main()
