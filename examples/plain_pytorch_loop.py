"""grad_guard in a plain PyTorch loop: monitor, detect, clip and log with ``GradientGuard``.

Run:  python examples/plain_pytorch_loop.py --logdir runs/plain
Then: tensorboard --logdir runs/plain

Step 30 gets a NaN loss on purpose: the guard reports the layers, drops the step (the
weights do not move) and training goes on.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from grad_guard import ZClip
from grad_guard.loop import GradientGuard


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )


def main(argv: list[str] | None = None) -> GradientGuard:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--logdir", default="runs/plain", help="TensorBoard log folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--nan-step", type=int, default=30, help="poison this step (-1: none)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs, targets = torch.randn(1024, 16), torch.randn(1024, 1)
    writer = SummaryWriter(args.logdir)
    guard = GradientGuard(
        model,
        optimizer,
        clipping=ZClip(z_threshold=2.5, warmup_steps=25),
        writer=writer,
        log_every_n_steps=args.log_every,
        on_nonfinite="skip",
    )

    for step in range(args.steps):
        batch = torch.randint(0, len(inputs), (32,))
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        if step == args.nan_step:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        result = guard.step(step)  # <- between backward() and optimizer.step()
        if result.should_step:
            optimizer.step()
        if result.should_stop:
            break

    guard.flush()
    writer.close()
    print(f"anomalies: {guard.counts}; clipped {guard.clipping.clipped_fraction:.0%} of the steps")
    print(f"Run: tensorboard --logdir {args.logdir}")
    return guard


if __name__ == "__main__":
    main()
