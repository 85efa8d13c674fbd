"""What the ``"rollback"`` action costs: snapshot time per step and memory, as ratios.

A snapshot copies the weights, the optimizer state and the schedulers' state to host
memory. It is taken every ``snapshot_every_n_steps`` healthy steps, so its cost per step
is ``snapshot time / interval``; this prints it as a fraction of one training step
(forward, backward, AdamW step) of the same model, measured side by side, and the
snapshot's size as a multiple of the model's parameter bytes.

Run:  python benchmarks/rollback.py [--interval 100] [--rounds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from grad_guard.core.rollback import RecoveryTargets, restore_snapshot, take_snapshot


def mlp(width: int = 350, depth: int = 100) -> nn.Module:
    """~12M parameters in ~200 tensors (as in overhead.py)."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interval", type=int, default=100, help="snapshot_every_n_steps")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(64, 350)

    def train_step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    targets = RecoveryTargets(modules=[model], optimizers=[optimizer])
    for _ in range(2):  # warm-up, and the optimizer state exists
        train_step()
    steps, snaps, restores = [], [], []
    for _ in range(args.rounds):  # interleaved
        start = time.perf_counter()
        train_step()
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        snapshot = take_snapshot(0, targets)
        snaps.append(time.perf_counter() - start)
        start = time.perf_counter()
        restore_snapshot(snapshot, targets)
        restores.append(time.perf_counter() - start)
    step, snap, restore = (statistics.median(v) for v in (steps, snaps, restores))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} thread(s), MLP {param_bytes / 4e6:.1f}M params")
    print(f"  training step (AdamW)          {step * 1e3:8.1f} ms")
    print(f"  snapshot                       {snap * 1e3:8.1f} ms = {snap / step:.2f} steps")
    print(f"  restore (a rollback)           {restore * 1e3:8.1f} ms = {restore / step:.2f} steps")
    print(
        f"  per step at snapshot_every_n_steps={args.interval}: "
        f"{snap / args.interval / step:.2%} of step time"
    )
    print(
        f"  snapshot memory: {snapshot.nbytes / 2**20:.0f} MiB = "
        f"{snapshot.nbytes / param_bytes:.2f}x the parameters (weights + AdamW moments)"
    )


if __name__ == "__main__":
    main()
