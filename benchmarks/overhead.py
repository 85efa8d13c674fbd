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
- ``GradGuard defaults, non-logging step``: detection (one packed flag read per step) and
  ZClip clipping on top of the shared pass.
- ``GradGuard everything on, logging step``: defaults plus histograms and update ratio,
  on a logging step.
- ``Lightning recipe + gradient_clip_val``: the recipe above plus ``clip_grad_norm_``,
  what a user without grad_guard pays on a logging step to see norms and clip.

Then an end-to-end ``Trainer.fit`` on the MLP, with and without ``GradGuard()``,
alternating runs, as a throughput ratio.

Run:  python benchmarks/overhead.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn

from grad_guard import GradGuard, GradientNormMonitor
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
        world_size=1,
        should_stop=False,
        precision_plugin=None,
        gradient_clip_val=None,
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

        guard = GradGuard(report=False)
        guard_all = GradGuard(
            monitor=GradientNormMonitor(histogram_every_n_steps=1, image_every_n_steps=None),
            report=False,
        )
        for callback in (guard, guard_all):
            callback.setup(trainer, model, "fit")

        def monitor_step(monitor: Any, logging: bool) -> Callable[[], None]:
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

        def recipe_and_clip() -> None:
            lightning_recipe()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            restore()

        candidates: dict[str, Callable[[], None]] = {
            "clip_grad_norm_": lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0), restore()),
            "foreach_norm pass": lambda: torch._foreach_norm(grads, 2.0),
            "monitor, non-logging step": monitor_step(plain, logging=False),
            "monitor, logging step": monitor_step(plain, logging=True),
            "monitor, logging step + update ratio": monitor_step(with_update, logging=True),
            "Lightning grad_norm recipe": lightning_recipe,
            "GradGuard defaults, non-logging step": lambda: (
                monitor_step(guard, logging=False)(),
                restore(),
            ),
            "GradGuard everything on, logging step": lambda: (
                monitor_step(guard_all, logging=True)(),
                restore(),
            ),
            "Lightning recipe + gradient_clip_val": recipe_and_clip,
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
    # entries that clip restore the gradients afterwards: take the copy out
    for key in (
        "clip_grad_norm_",
        "GradGuard defaults, non-logging step",
        "GradGuard everything on, logging step",
        "Lightning recipe + gradient_clip_val",
    ):
        medians[key] -= statistics.median(restore_cost)
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
    print(
        "  GradGuard everything on (logging step) vs recipe + gradient_clip_val: "
        f"{medians['GradGuard everything on, logging step'] / medians['Lightning recipe + gradient_clip_val']:.2f}x"
    )


def fit_throughput(steps: int, repeats: int) -> None:
    """Steady-state steps/s of ``Trainer.fit`` with ``GradGuard()`` vs a bare Trainer.

    Timed from the end of step 2 to the end of the last step, so both runs pay the same
    start-up; the one-off end-of-fit work (report, pictures) is printed separately.
    """
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.net(x).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.fit_end = 0.0

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_fit_end(self, *args: Any) -> None:
            self.fit_end = time.perf_counter()

    data = DataLoader(TensorDataset(torch.randn(64 * steps, 350)), batch_size=64)
    rates: dict[str, list[float]] = {"bare Trainer": [], "GradGuard()": []}
    end_costs: list[float] = []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            for name in rates:
                clock = StepClock()
                # the clock runs last, so the end-of-fit work of GradGuard is inside fit_end
                callbacks = [GradGuard(), clock] if name == "GradGuard()" else [clock]
                trainer = L.Trainer(
                    max_steps=steps,
                    log_every_n_steps=50,
                    default_root_dir=root,
                    accelerator="cpu",
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                    callbacks=callbacks,
                )
                torch.manual_seed(0)
                trainer.fit(Module(), data)
                rates[name].append((len(clock.ends) - 2) / (clock.ends[-1] - clock.ends[1]))
                if name == "GradGuard()":
                    end_costs.append(clock.fit_end - clock.ends[-1])
    bare, guarded = (statistics.median(v) for v in rates.values())
    print(f"\nTrainer.fit on the MLP, {steps} steps x {repeats} alternating runs (median):")
    print(f"  bare Trainer {bare:.2f} steps/s, GradGuard() {guarded:.2f} steps/s")
    print(f"  throughput ratio GradGuard / bare: {guarded / bare:.3f}")
    print(f"  one-off end-of-fit report and pictures: {statistics.median(end_costs):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fit-steps", type=int, default=60, help="0 skips the fit comparison")
    parser.add_argument("--fit-repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 gives stable ratios on a shared machine)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bench("MLP", mlp(), args.rounds)
    bench("Transformer", transformer(), args.rounds)
    if args.fit_steps:
        fit_throughput(args.fit_steps, args.fit_repeats)


if __name__ == "__main__":
    main()
