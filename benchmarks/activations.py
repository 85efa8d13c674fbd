"""Cost of ActivationMonitor's hooks, as a ratio of a plain forward pass, measured side by side.

Candidates, each timed on the same model and batch, interleaved (one run of each per
round, rotating order) so machine noise hits all alike; figures are medians:

- ``plain forward``: the model's forward (grad mode on, as in training), no hooks.
- ``non-logging step``: the forward after the hooks were armed and removed again (what
  every step between logging steps pays); the script also asserts that no forward hook
  is left on any module.
- ``logging step``: arm, forward, disarm, one packed host copy, build the tags.
- ``forward + backward`` and ``... + logging step``: the same around a training step,
  for scale.

Run:  python benchmarks/activations.py [--rounds 30] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from grad_guard.core.activation_history import activation_metrics
from grad_guard.core.activations import ActivationHooks


def relu_mlp(width: int = 512, depth: int = 16) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def tanh_mlp(width: int = 512, depth: int = 16) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def cnn(channels: int = 64, blocks: int = 8) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for _ in range(blocks):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


def transformer(layers: int = 12, d_model: int = 256) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        d_model, nhead=8, dim_feedforward=4 * d_model, batch_first=True, activation="gelu"
    )
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def median_times(candidates: dict[str, Callable[[], None]], rounds: int, sync: Callable) -> dict:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for name in names:  # warm up
        candidates[name]()
    sync()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync()
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench(name: str, model: nn.Module, batch: torch.Tensor, rounds: int, device: str) -> None:
    model = model.to(device)
    batch = batch.to(device)
    hooks = ActivationHooks(model)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> None:
        model(batch)

    def non_logging() -> None:
        assert hooks_on(model) == 0, "a hook was left on the model"
        model(batch)

    def logging() -> None:
        hooks.arm()
        model(batch)
        hooks.disarm()
        activation_metrics(hooks.read())

    def train() -> None:
        model(batch).float().mean().backward()

    def train_logging() -> None:
        hooks.arm()
        model(batch).float().mean().backward()
        hooks.disarm()
        activation_metrics(hooks.read())

    candidates = {
        "plain forward": plain,
        "non-logging step": non_logging,
        "logging step": logging,
        "forward + backward": train,
        "forward + backward, logging step": train_logging,
    }
    result = median_times(candidates, rounds, sync)
    hooks.arm()
    armed = hooks.hook_count
    hooks.disarm()
    assert hooks_on(model) == 0
    base, train_base = result["plain forward"], result["forward + backward"]
    print(f"\n{name}: {len(hooks.layer_names)} layers, {armed} hooks while armed, 0 between")
    for label, seconds in result.items():
        ref = train_base if label.startswith("forward + backward") else base
        print(f"  {label:34s} {1e3 * seconds:9.3f} ms   x{seconds / ref:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, device {args.device}, {args.threads} CPU thread(s), "
        f"batch {args.batch}, {args.rounds} rounds, medians"
    )
    b = args.batch
    bench("ReLU MLP 16 x 512", relu_mlp(), torch.randn(b, 512), args.rounds, args.device)
    bench("tanh MLP 16 x 512", tanh_mlp(), torch.randn(b, 512), args.rounds, args.device)
    bench("CNN 8 blocks x 64 ch, 32x32", cnn(), torch.randn(b // 8, 3, 32, 32), args.rounds, args.device)
    bench(
        "transformer 12 x 256, 64 tokens",
        transformer(),
        torch.randn(b // 8, 64, 256),
        args.rounds,
        args.device,
    )


if __name__ == "__main__":
    main()
