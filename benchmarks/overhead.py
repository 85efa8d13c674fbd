"""Per-optimizer-step cost of grad_guard's step engine, measured side by side.

Every candidate runs on the same gradients, interleaved (one run of each per round, in
rotating order) so machine noise hits all alike; figures are medians, printed as ratios
to ``torch.nn.utils.clip_grad_norm_`` on the same gradients. The engine is driven
through ``GradientGuard`` (the plain-loop front end); the Lightning callbacks run the
same engine, which the ``Trainer.fit`` comparison at the end measures end to end.

Candidates (per model):
- ``clip_grad_norm_``: what most loops already pay every step (read + multiply).
- ``GradGuard defaults, non-logging``: ZClip + detection with skip armed, non-fused
  optimizer: one stats pass, the rules, one tiny read (skip needs it) that carries the
  clip factor too; an unclipped step (ZClip clips spikes only) multiplies nothing.
- ``... clipped every step``: the same when the factor is below 1 (``NormClip``
  with a limit under the norm): the multiply after the read.
- ``... no action armed``: ``on_nonfinite="warn"``: no read at all, so the factor is
  always multiplied in, as ``clip_grad_norm_`` does.
- ``GradGuard defaults + fused AdamW``: the same with the clip and skip folded into the
  fused kernel: one read of the gradients, no multiply, no host sync.
- ``logging step + update ratio``: everything reported in one host copy, plus the
  weight snapshot and the update norms after the step.

Run:  python benchmarks/overhead.py [--rounds 30] [--threads 1] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from grad_guard import GradGuard, GradientGuard, NormClip


def mlp(width: int = 350, depth: int = 100) -> nn.Module:
    """~12M parameters in ~200 tensors."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def transformer(layers: int = 90, d_model: int = 64) -> nn.Module:
    """A small transformer encoder with more than 1000 parameter tensors."""
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=128, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def tiny_tensors(count: int = 10_000) -> nn.Module:
    """10k tiny parameter tensors (a worst case for per-tensor Python work)."""
    return nn.ParameterList([nn.Parameter(torch.randn(8)) for _ in range(count)])


_CLOCK = time.perf_counter


def timed(fn: Callable[[], Any]) -> float:
    start = _CLOCK()
    fn()
    return _CLOCK() - start


def bench(name: str, model: nn.Module, rounds: int) -> dict[str, float]:
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    sgd = torch.optim.SGD(params, lr=1e-3)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    plain = GradientGuard(model, sgd)
    clipped = GradientGuard(model, sgd, clipping=NormClip(1e-4))
    unarmed = GradientGuard(model, sgd, on_nonfinite="warn")
    folded = GradientGuard(model, fused)
    logging = GradientGuard(model, sgd, log_every_n_steps=1, writer=_writer())
    counter = {"plain": 0, "clipped": 0, "unarmed": 0, "folded": 0}

    def guard_step(guard: GradientGuard, key: str) -> Callable[[], None]:
        def run() -> None:
            counter[key] += 1
            guard.step(1 + 50 * counter[key] + 1)  # never a logging step (every 50)
            restore()

        return run

    def logging_step() -> None:
        logging.step()
        logging._engine.after_step(0)  # the update ratio, as after optimizer.step()
        restore()

    candidates: dict[str, Callable[[], Any]] = {
        "clip_grad_norm_": lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0), restore()),
        "GradGuard defaults, non-logging": guard_step(plain, "plain"),
        "  ... clipped every step (NormClip)": guard_step(clipped, "clipped"),
        "  ... no action armed (no read)": guard_step(unarmed, "unarmed"),
        "GradGuard defaults + fused AdamW": guard_step(folded, "folded"),
        "logging step + update ratio": logging_step,
    }
    for fn in candidates.values():  # warm-up: caches, allocator, writer
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    restore_cost = []
    names = list(candidates)
    for r in range(rounds):
        for offset in range(len(names)):
            key = names[(r + offset) % len(names)]
            times[key].append(timed(candidates[key]))
        restore_cost.append(timed(restore))
    medians = {k: statistics.median(v) - statistics.median(restore_cost) for k, v in times.items()}
    base = medians["clip_grad_norm_"]
    n_params = sum(p.numel() for p in params)
    print(f"\n{name}: {n_params / 1e6:.2f}M parameters in {len(params)} tensors, {rounds} rounds")
    print(f"  {'candidate':38s} {'median ms':>10s} {'x clip_grad_norm_':>18s}")
    for key, value in medians.items():
        print(f"  {key:38s} {value * 1e3:10.3f} {value / base:18.2f}")
    return {k: v / base for k, v in medians.items()}


def _writer() -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(tempfile.mkdtemp())


def fit_throughput(steps: int, repeats: int) -> None:
    """Steady-state steps/s of ``Trainer.fit``: GradGuard vs its no-grad_guard twin."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self, fused: bool) -> None:
            super().__init__()
            self.net = mlp()
            self.fused = fused

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            if self.fused:
                return torch.optim.AdamW(self.parameters(), lr=1e-5, fused=True)
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

    data = DataLoader(TensorDataset(torch.randn(64 * steps, 350)), batch_size=64)
    pairs = {
        "SGD: GradGuard() / Trainer(gradient_clip_val=1.0)": (False, {"gradient_clip_val": 1.0}),
        "fused AdamW: GradGuard() / bare Trainer": (True, {}),
    }
    with tempfile.TemporaryDirectory() as root:
        for title, (fused, baseline) in pairs.items():
            rates: dict[str, list[float]] = {"baseline": [], "guard": []}
            for _ in range(repeats):
                for name in rates:
                    clock = StepClock()
                    guard = [GradGuard(report=False)] if name == "guard" else []
                    trainer = L.Trainer(
                        max_steps=steps,
                        log_every_n_steps=50,
                        default_root_dir=root,
                        accelerator="cpu",
                        enable_progress_bar=False,
                        enable_model_summary=False,
                        enable_checkpointing=False,
                        logger=False,
                        callbacks=[*guard, clock],
                        **({} if name == "guard" else baseline),
                    )
                    torch.manual_seed(0)
                    trainer.fit(Module(fused), data)
                    rates[name].append((len(clock.ends) - 2) / (clock.ends[-1] - clock.ends[1]))
            base, guarded = (statistics.median(v) for v in rates.values())
            print(f"  {title}: {guarded / base:.3f} ({guarded:.2f} vs {base:.2f} steps/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fit-steps", type=int, default=60, help="0 skips the fit comparison")
    parser.add_argument("--fit-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time (steadier on a shared machine, 1 thread only)",
    )
    args = parser.parse_args()
    global _CLOCK
    _CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock")
    bench("MLP", mlp(), args.rounds)
    bench("Transformer", transformer(), args.rounds)
    bench("10k tiny tensors", tiny_tensors(), max(5, args.rounds // 3))
    if args.fit_steps:
        print(f"\nTrainer.fit on the MLP, {args.fit_steps} steps x {args.fit_repeats} runs:")
        fit_throughput(args.fit_steps, args.fit_repeats)


if __name__ == "__main__":
    main()
