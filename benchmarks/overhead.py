"""Per-optimizer-step cost of grad_guard's monitoring, measured side by side.

Every candidate runs on the same gradients, interleaved (one run of each per round, in
rotating order) so that machine noise hits all of them alike; the figures are medians
and are printed as ratios to ``torch.nn.utils.clip_grad_norm_`` on the same gradients.

Candidates:
- ``clip_grad_norm_``: what most training loops already pay every step.
- ``foreach_norm pass``: one ``torch._foreach_norm`` over the gradients (the floor).
- ``monitor, non-logging step``: ``GradientNormMonitor.on_before_optimizer_step``
  between logging steps.
- ``monitor, logging step``: the same hook on a logging step (grad + param norms, one
  host copy, scalars written to a real TensorBoard writer), with the update ratio off.
- ``monitor, logging step + update ratio``: also snapshots the weights and computes
  ``||dW|| / ||W||`` after the step.
- ``Lightning grad_norm recipe``: ``lightning.pytorch.utilities.grad_norm`` followed by
  what ``self.log_dict`` does with the values on a logging step (one ``.item()`` per
  parameter, then the logger writes them).

Run:  python benchmarks/overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn

from grad_guard import GradientNormMonitor
from grad_guard.callbacks import shared_pass


def mlp(width: int = 350, depth: int = 100) -> nn.Module:
    """~12M parameters in ~200 tensors."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def transformer(layers: int = 90, d_model: int = 64) -> nn.Module:
    """A small transformer encoder with more than 1000 parameter tensors."""
    layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=128, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def fill_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3


class FakeTrainer(SimpleNamespace):
    """The few Trainer attributes grad_guard's hook reads, so the real hook runs alone."""

    __hash__ = object.__hash__


def make_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, logdir: str) -> FakeTrainer:
    logger = TensorBoardLogger(logdir, name="bench")
    trainer = FakeTrainer(
        global_step=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
        loggers=[logger],
        optimizers=[optimizer],
        log_every_n_steps=50,
        callbacks=[],
        is_global_zero=True,
    )
    return trainer


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, model: nn.Module, rounds: int) -> None:
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    fill_grads(model)
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    with tempfile.TemporaryDirectory() as logdir:
        plain = GradientNormMonitor(log_every_n_steps=50, log_update_ratio=False)
        with_update = GradientNormMonitor(log_every_n_steps=50, log_update_ratio=True)
        trainer = make_trainer(model, optimizer, logdir)
        trainer.callbacks = [plain]
        step = [0]

        def monitor_step(monitor: GradientNormMonitor, logging: bool) -> Callable[[], None]:
            def run() -> None:
                step[0] += 1
                # a fresh step: logging steps are multiples of 50
                trainer.global_step = step[0]
                trainer.fit_loop.epoch_loop._batches_that_stepped = 50 * step[0] if logging else 1
                monitor.on_before_optimizer_step(trainer, model, optimizer)
                monitor.on_train_batch_end(trainer, model, None, None, 0)

            return run

        recipe_logger = trainer.loggers[0]

        def lightning_recipe() -> None:
            # what `self.log_dict(grad_norm(self, 2))` amounts to on a logging step
            norms = grad_norm(model, norm_type=2)
            recipe_logger.log_metrics({k: v.item() for k, v in norms.items()}, step=0)

        candidates: dict[str, Callable[[], None]] = {
            "clip_grad_norm_": lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0), restore()),
            "foreach_norm pass": lambda: torch._foreach_norm(grads, 2.0),
            "monitor, non-logging step": monitor_step(plain, logging=False),
            "monitor, logging step": monitor_step(plain, logging=True),
            "monitor, logging step + update ratio": monitor_step(with_update, logging=True),
            "Lightning grad_norm recipe": lightning_recipe,
        }
        restore_cost = []
        for fn in candidates.values():  # warm-up: caches, allocator, writer
            fn()
        shared_pass.reset(trainer)
        times: dict[str, list[float]] = {k: [] for k in candidates}
        names = list(candidates)
        for r in range(rounds):
            for offset in range(len(names)):
                key = names[(r + offset) % len(names)]
                times[key].append(timed(candidates[key]))
            restore_cost.append(timed(restore))

    medians = {k: statistics.median(v) for k, v in times.items()}
    # clip_grad_norm_'s entry includes the restore copy; take it out
    medians["clip_grad_norm_"] -= statistics.median(restore_cost)
    base = medians["clip_grad_norm_"]
    n_params = sum(p.numel() for p in params)
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters in {len(params)} tensors, {rounds} rounds")
    print(f"  {'candidate':40s} {'median ms':>10s} {'x clip_grad_norm_':>18s}")
    for key, value in medians.items():
        print(f"  {key:40s} {value * 1e3:10.3f} {value / base:18.2f}")
    recipe = medians["Lightning grad_norm recipe"]
    print(
        f"  monitor logging step vs Lightning recipe: "
        f"{medians['monitor, logging step'] / recipe:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bench("MLP", mlp(), args.rounds)
    bench("Transformer", transformer(), args.rounds)


if __name__ == "__main__":
    main()
