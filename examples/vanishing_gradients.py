"""Vanishing gradients in a deep MLP, and the fix, in plain PyTorch (no Lightning).

Builds 20-layer MLPs on the digits data, measures every layer's gradient norm at step 0
with grad_guard's pure-torch core, prints them with the first/last layer ratio, then
trains each model for a few steps and prints its accuracy.

Run:   python examples/vanishing_gradients.py [--depth 20] [--steps 200]
Needs: pip install "grad-guard[demo]"   (scikit-learn ships the digits data offline)

Edit CONFIGS below to try other activations / inits / depths.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer
from grad_guard.data import digits_dataset, make_loader
from grad_guard.models import DeepMLP, ResidualMLP, weight_layer_names

# (label, model factory): edit me
CONFIGS = {
    "sigmoid + default init": lambda depth: DeepMLP(
        64, 10, depth=depth, activation="sigmoid", init="default"
    ),
    "tanh + Xavier init": lambda depth: DeepMLP(
        64, 10, depth=depth, activation="tanh", init="xavier"
    ),
    "ReLU + He init": lambda depth: DeepMLP(64, 10, depth=depth, activation="relu", init="he"),
    "residual + BatchNorm": lambda depth: ResidualMLP(64, 10, depth=depth, activation="relu"),
}


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """One forward/backward pass; per-layer gradient norms in forward order."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    stats = GradientStatsComputer(group_parameters(model))()
    norms = stats.to_dict()
    model.zero_grad(set_to_none=True)
    return norms


def train(model: nn.Module, loader, steps: int, lr: float) -> float:
    """Plain SGD for ``steps`` steps; returns the last loss (NaN if it diverged)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    step = 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps or not torch.isfinite(loss):
                return loss.item()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, help="Linear layers per model")
    parser.add_argument("--steps", type=int, default=200, help="SGD steps per model (0: skip)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = digits_dataset()
    x_all, y_all = dataset.tensors
    x, y = next(iter(make_loader(dataset, batch_size=64, seed=args.seed)))

    for label, factory in CONFIGS.items():
        torch.manual_seed(args.seed)
        model = factory(args.depth)
        norms = gradient_norms(model, x, y)
        weights = [name for name in weight_layer_names(model) if name in norms]
        first, last = weights[0], weights[-1]
        print(f"\n== {label} (depth {args.depth}): gradient norm per layer at step 0, log scale")
        for name in weights:
            # log scale, 2 characters per decade: 1e-16 -> 4, 1e0 -> 36
            bar = "#" * max(1, min(44, int(2 * (math.log10(norms[name] or 1e-45) + 18))))
            print(f"  {name:>16}  {norms[name]:9.2e}  {bar}")
        print(f"  first/last gradient ratio ({first} / {last}): {norms[first] / norms[last]:.2e}")
        if args.steps > 0:
            start = time.perf_counter()
            loss = train(
                model, make_loader(dataset, 64, seed=args.seed, drop_last=True), args.steps, args.lr
            )
            print(
                f"  after {args.steps} SGD steps (lr {args.lr}): loss {loss:.3f}, "
                f"accuracy {accuracy(model, x_all, y_all):.1%} "
                f"({time.perf_counter() - start:.1f}s)"
            )


if __name__ == "__main__":
    main()
