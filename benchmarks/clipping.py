"""Per-step cost of grad_guard's clipping algorithms, measured side by side.

Every candidate clips the same gradients (restored from a saved copy before each run,
outside the timed region, so every run scales the same values and no run works on
denormals left by the previous one). Runs are interleaved (one run of each per round,
in rotating order) so machine noise hits all of them alike; the figures are medians.

Two ratios are printed for each algorithm:

- ``x clip_grad_norm_``: against ``torch.nn.utils.clip_grad_norm_`` on the same
  gradients, what a training loop pays for plain norm clipping.
- ``x reference``: against the approach of the published implementations, written
  here the way they work: AutoClip's original recipe (one ``.item()`` per parameter for
  the norm, a Python list and ``np.percentile``, then ``clip_grad_norm_``), ZClip's
  reference (a per-parameter ``square().sum()`` stacked, ``.item()``, Python-float EMA
  and a per-parameter ``mul_`` loop), and timm's AGC (per-parameter unit norms and a
  ``torch.where`` copy).

Two entry points are measured: the plain-loop call ``clipper(params)`` (the same list
``clip_grad_norm_`` gets; AGC is bound to the model once), which reads the gradients
for the norm itself, and ``clipper.clip_stats(stats)``, what the Lightning callback runs
after the shared statistics pass (whose cost the monitor already pays; the per-tensor
mode gets a ``granularity="parameter"`` pass, as the callback asks for).

The reference implementations take the model, as they do in their repositories.

Run:  python benchmarks/clipping.py [--rounds 30] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from grad_guard.core.clip import AGC, AutoClip, ClipAlgorithm, NormClip, ValueClip, ZClip
from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer


def mlp(width: int = 350, depth: int = 100) -> nn.Module:
    """~12M parameters in ~200 tensors."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


# -- the published implementations' approach --------------------------------------------


class ReferenceAutoClip:
    """AutoClip as published: per-parameter ``.item()`` norms, a list, ``np.percentile``."""

    def __init__(self, percentile: float = 10.0) -> None:
        self.percentile = percentile
        self.history: list[float] = []

    def __call__(self, model: nn.Module) -> None:
        total = 0.0
        for p in model.parameters():
            if p.grad is not None:
                total += p.grad.detach().norm(2).item() ** 2
        self.history.append(math.sqrt(total))
        clip_value = float(np.percentile(self.history, self.percentile))
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_value)


class ReferenceZClip:
    """ZClip's reference: stacked per-parameter sums, ``.item()``, Python-float EMA."""

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 5) -> None:
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.buffer: list[float] = []
        self.mean = self.var = 0.0

    def __call__(self, model: nn.Module) -> None:
        squares = [p.grad.square().sum() for p in model.parameters() if p.grad is not None]
        norm = torch.stack(squares).sum().sqrt().item()
        if len(self.buffer) < self.warmup_steps:
            self.buffer.append(norm)
            if len(self.buffer) == self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            return
        std = self.var**0.5
        z = (norm - self.mean) / (std + 1e-6)
        value = norm
        if z > self.z_thresh:
            value = self.mean + (self.z_thresh**2 / z) * std
            coefficient = value / (norm + 1e-6)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coefficient)
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2


def reference_agc(model: nn.Module, clip_factor: float = 0.01, eps: float = 1e-3) -> None:
    """timm's ``adaptive_clip_grad``: one unit-norm pair and a ``where`` per parameter."""

    def unitwise(x: torch.Tensor) -> torch.Tensor:
        if x.ndim <= 1:
            return x.norm(2)
        return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in model.parameters():
        if p.grad is None:
            continue
        weights, grads = p.detach(), p.grad.detach()
        max_norm = unitwise(weights).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise(grads)
        clipped = grads * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, grads, clipped))


# -- timing ------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model: nn.Module, rounds: int) -> None:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # total norm ~3.5: every algorithm clips
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    stats_computers = {
        granularity: GradientStatsComputer(group_parameters(model, granularity))
        for granularity in ("module", "parameter")
    }

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    algorithms: dict[str, ClipAlgorithm] = {
        "NormClip(1.0)": NormClip(1.0),
        "NormClip(0.05, per_parameter=True)": NormClip(0.05, per_parameter=True),
        "ValueClip(1e-3)": ValueClip(1e-3),
        "AutoClip()": AutoClip(),
        "ZClip()": ZClip(warmup_steps=5),
        "AGC()": AGC(),
    }
    references: dict[str, Callable[[nn.Module], None]] = {
        "AutoClip()": ReferenceAutoClip(),
        "ZClip()": ReferenceZClip(warmup_steps=5),
        "AGC()": reference_agc,
    }
    stats = {g: computer() for g, computer in stats_computers.items()}

    def new_pass() -> None:
        stats["module"] = stats_computers["module"]()

    candidates: dict[str, Callable[[], object]] = {
        "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "statistics pass (shared)": new_pass,
    }
    for name, algorithm in algorithms.items():
        algorithm.bind(model)  # AGC: layer types and head; then it takes the same list
        candidates[name] = lambda a=algorithm: a(params)
        candidates[f"{name}.clip_stats"] = lambda a=algorithm: a.clip_stats(stats[a.granularity])
    for name, reference in references.items():
        candidates[f"reference {name}"] = lambda r=reference: r(model)

    def fresh_stats() -> None:
        for granularity, computer in stats_computers.items():
            stats[granularity] = computer()

    for fn in candidates.values():  # warm-up: allocator, index caches, ZClip's warm-up
        for _ in range(6):
            restore()
            fresh_stats()
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    names = list(candidates)
    for r in range(rounds):
        for offset in range(len(names)):
            key = names[(r + offset) % len(names)]
            restore()
            if key.endswith(".clip_stats"):
                fresh_stats()  # the pass the callback shares, untimed
            times[key].append(timed(candidates[key]))

    medians = {k: statistics.median(v) for k, v in times.items()}
    base = medians["clip_grad_norm_"]
    n_params = sum(p.numel() for p in params)
    print(
        f"MLP: {n_params / 1e6:.1f}M parameters in {len(params)} tensors, {rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"  {'candidate':44s} {'median ms':>10s} {'x clip_grad_norm_':>18s} {'x reference':>12s}"
    )
    print(header)
    for key, value in medians.items():
        algorithm_name = key.removesuffix(".clip_stats")
        reference = medians.get(f"reference {algorithm_name}") if algorithm_name == key else None
        ratio = f"{value / reference:12.2f}" if reference else f"{'':12s}"
        print(f"  {key:44s} {value * 1e3:10.3f} {value / base:18.2f} {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run(mlp(), args.rounds)


if __name__ == "__main__":
    main()
