"""Run a scenario on 2 CPU processes (gloo) and bring each rank's result back to the test.

Each scenario is a module-level function ``scenario(rank, world_size, out_dir, **kwargs)``
run in a fresh process (``spawn``) with the environment a launcher such as ``torchrun``
would set (``LOCAL_RANK``...), so Lightning's ``ddp``/``ModelParallelStrategy``/
``FSDPStrategy`` start there without relaunching the test command. The return value is
saved with ``torch.save`` and handed back to the test. Every run has a deadline: a rank
that fails or hangs takes the others down and the test fails with the traceback.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    scenario: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    kwargs: dict[str, Any],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
        PYTHONWARNINGS="ignore",
    )
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"result_rank{rank}.pt")
    try:
        result = scenario(rank, world_size, out_dir, **kwargs)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    scenario: Callable[..., Any],
    out_dir: Any,
    world_size: int = 2,
    timeout: float = 150.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``scenario`` on ``world_size`` processes; return each rank's result.

    Fails the test (never hangs it) when a rank raises, dies or runs past ``timeout``.
    """
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [
        context.Process(
            target=_entry, args=(scenario, rank, world_size, port, out_dir, kwargs), daemon=True
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while any(p.is_alive() for p in processes):
            if time.monotonic() > deadline:
                timed_out = True
                break
            if any(p.exitcode not in (None, 0) for p in processes):
                break  # the others would wait forever in their next collective
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(10)

    results, errors = [], []
    for rank, process in enumerate(processes):
        path = os.path.join(out_dir, f"result_rank{rank}.pt")
        if not os.path.exists(path):
            errors.append(f"rank {rank}: no result (exit code {process.exitcode})")
            continue
        saved = torch.load(path, weights_only=False)
        if not saved["ok"]:
            errors.append(f"rank {rank} raised:\n{saved['error']}")
        results.append(saved.get("result"))
    if timed_out:
        errors.insert(0, f"{scenario.__name__} ran past its {timeout:.0f} s deadline")
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return results


# ---------------------------------------------------------------------------- counting


GRAD_GUARD_DIR = os.path.join(os.path.dirname(os.path.dirname(TESTS_DIR)), "src", "grad_guard")
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "all_to_all_single",
)
_FUNCTIONAL_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather_tensor",
    "all_gather_single",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "broadcast",
    "all_to_all_single",
)


def _grad_guard_frames() -> tuple[bool, bool]:
    """(called from grad_guard code, called from inside a statistics pass)."""
    import grad_guard
    from grad_guard.core.stats import GradientStatsComputer

    package = os.path.dirname(os.path.abspath(grad_guard.__file__))
    frame = sys._getframe(2)
    from_grad_guard = in_pass = False
    while frame is not None:
        if frame.f_code.co_filename.startswith(package):
            from_grad_guard = True
            if frame.f_code.co_name == "__call__" and isinstance(
                frame.f_locals.get("self"), GradientStatsComputer
            ):
                in_pass = True
        frame = frame.f_back
    return from_grad_guard, in_pass


class CollectiveCounter:
    """Counts collectives issued from grad_guard code, per training batch.

    ``step`` is advanced by :class:`StepMarker`; ``counts[step]`` are all collectives
    from grad_guard in that batch, ``pass_counts[step]`` those made by the statistics
    pass itself.
    """

    def __init__(self) -> None:
        self.step = -1
        self.counts: Counter[int] = Counter()
        self.pass_counts: Counter[int] = Counter()

    def _wrap(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from_grad_guard, in_pass = _grad_guard_frames()
            if from_grad_guard:
                self.counts[self.step] += 1
            if in_pass:
                self.pass_counts[self.step] += 1
            return original(*args, **kwargs)

        return wrapper

    @contextmanager
    def patched(self) -> Iterator[CollectiveCounter]:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        saved: list[tuple[Any, str, Any]] = []
        for module, names in ((dist, _COLLECTIVES), (funcol, _FUNCTIONAL_COLLECTIVES)):
            for name in names:
                original = getattr(module, name, None)
                if original is not None:
                    saved.append((module, name, original))
                    setattr(module, name, self._wrap(original))
        try:
            yield self
        finally:
            for module, name, original in saved:
                setattr(module, name, original)


# ---------------------------------------------------------------------------- models


def regression_loader(
    n: int = 32, batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Any:
    """A deterministic regression loader: 5 features, 1 target, no shuffling.

    With ``world_size > 1`` the loader yields rank ``rank``'s part through an unshuffled
    ``DistributedSampler`` (Lightning would insert a shuffling one), so batch ``k`` of all
    ranks together is batch ``k`` of the single-process loader with
    ``batch_size * world_size``.
    """
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=generator)
    y = torch.randn(n, 1, generator=generator)
    dataset = TensorDataset(x, y)
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler)


def make_module(**kwargs: Any) -> ShardableModule:
    """A :class:`ShardableModule` seeded the same way in every process."""
    L.seed_everything(0, verbose=False)
    return ShardableModule(**kwargs)


class ShardableModule(L.LightningModule):
    """``Linear(5, 7) -> Tanh -> Linear(7, 3) -> Tanh -> Linear(3, 1)``, MSE loss.

    The dim-0 sizes 7, 3 and 1 do not split evenly over 2 ranks (rank 1 holds no row of
    the last weight). ``fsdp2=True`` applies ``fully_shard`` per ``Linear`` when there is
    a device mesh (``ModelParallelStrategy``). ``nan_loss_at=(rank, step)`` makes that
    rank's loss NaN at that step; ``inf_grad_at=(rank, step, layer)`` writes +inf into
    that rank's local gradient of ``net.<layer>.weight`` after backward.
    """

    def __init__(
        self,
        lr: float = 0.05,
        fsdp2: bool = False,
        nan_loss_at: tuple[int, int] | None = None,
        inf_grad_at: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)
        )
        self.lr = lr
        self.fsdp2 = fsdp2
        self.nan_loss_at = nan_loss_at
        self.inf_grad_at = inf_grad_at

    def configure_model(self) -> None:
        if not self.fsdp2 or self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.nan_loss_at == (self.global_rank, self.global_step):
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.inf_grad_at is None:
            return
        rank, step, layer = self.inf_grad_at
        if (self.global_rank, self.global_step) == (rank, step):
            grad = local(self.net[layer].weight.grad)
            if grad.numel():
                grad.view(-1)[0] = float("inf")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


# ---------------------------------------------------------------------------- callbacks


class StepMarker(L.Callback):
    """Numbers the batches (for :class:`CollectiveCounter`) and records, per batch,
    whether the optimizer step changed this rank's weights."""

    def __init__(self, counter: CollectiveCounter | None = None) -> None:
        self.counter = counter
        self.batch = -1
        self.changed: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.batch += 1
        if self.counter is not None:
            self.counter.step = self.batch
        self._before = [local(p).detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        after = [local(p).detach() for p in pl_module.parameters()]
        self.changed[self.batch] = any(not torch.equal(a, b) for a, b in zip(after, self._before))


class RecordingLogger(Logger):
    """Remembers every metric name it is asked to log, on every rank (no rank-zero guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.names.update(metrics)


# ---------------------------------------------------------------------------- values


GRAD_GUARD_PREFIXES = (
    "grad_norm/",
    "param_norm/",
    "grad_to_param/",
    "update_ratio/",
    "grad_guard/",
)


def is_grad_guard_tag(tag: str) -> bool:
    return tag.startswith(GRAD_GUARD_PREFIXES)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a ``DTensor``; other tensors unchanged."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_state(module: Any) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of a module's parameters, keyed by name (a collective
    under FSDP2: call it on every rank)."""
    out = {}
    for name, param in module.named_parameters():
        value = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = value.detach().clone().cpu()
    return out


def max_relative_difference(
    actual: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], floor: float = 1e-8
) -> float:
    """Largest ``|a - e| / max(|e|, floor)`` over the tags and steps of ``expected``.

    Fails when a tag or step of ``expected`` is missing from ``actual``.
    """
    worst = 0.0
    for tag, series in expected.items():
        assert tag in actual, f"{tag} missing (has {sorted(actual)})"
        assert sorted(actual[tag]) == sorted(series), (tag, sorted(actual[tag]), sorted(series))
        for step, value in series.items():
            got = actual[tag][step]
            assert math.isfinite(got) == math.isfinite(value), (tag, step, got, value)
            if math.isfinite(value):
                worst = max(worst, abs(got - value) / max(abs(value), floor))
    return worst


def states_equal(a: Any, b: Any) -> bool:
    """Deep equality for checkpoint-like structures holding tensors."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(local(a).cpu(), local(b).cpu())
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def per_step(counter: Counter[int]) -> dict[int, int]:
    return dict(sorted(counter.items()))


def group_by_step(values: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for tag, series in values.items():
        for step, value in series.items():
            out[step][tag] = value
    return dict(out)


# ---------------------------------------------------------------------------- scenarios


def make_trainer(
    out_dir: str, rank: int, strategy: Any, callbacks: list[Any], **kwargs: Any
) -> L.Trainer:
    """A quiet 2-process CPU Trainer; its TensorBoard logs go to ``out_dir/rank<r>``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [
        TensorBoardLogger(save_dir=os.path.join(out_dir, f"rank{rank}"), name="tb", version=0),
        RecordingLogger(),
    ]
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=4,
        log_every_n_steps=1,
        logger=loggers,
        callbacks=callbacks,
        default_root_dir=out_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def fit_and_measure(
    trainer: L.Trainer,
    module: L.LightningModule,
    loader: Any,
    weights: Callable[[L.Trainer, L.LightningModule], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Fit while counting grad_guard's collectives; what each rank reports back."""
    counter = CollectiveCounter()
    marker = StepMarker(counter)
    trainer.callbacks.append(marker)
    with counter.patched(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    recording = next(lg for lg in trainer.loggers if isinstance(lg, RecordingLogger))
    tensorboard = trainer.loggers[0]
    return {
        "grad_guard_tags": sorted(n for n in recording.names if is_grad_guard_tag(n)),
        "collectives": per_step(counter.counts),
        "pass_collectives": per_step(counter.pass_counts),
        "changed": dict(marker.changed),
        "weights": (weights or (lambda _, m: full_state(m)))(trainer, module),
        "warnings": [str(w.message) for w in caught if "grad_guard" in str(w.message)],
        "log_dir": tensorboard.log_dir,
        "global_step": trainer.global_step,
    }


def guarded_callbacks(log_every_n_steps: int = 1) -> list[L.Callback]:
    """Monitor + detection (skip non-finite steps) + clipping to a global norm of 0.5."""
    from grad_guard import GradientAnomalyDetection, GradientClipping, GradientNormMonitor
    from grad_guard.core.clip import NormClip

    return [
        GradientNormMonitor(log_every_n_steps=log_every_n_steps, histogram_every_n_steps=2),
        GradientAnomalyDetection(on_nonfinite="skip", log_every_n_steps=log_every_n_steps),
        GradientClipping(NormClip(max_norm=0.5), log_every_n_steps=log_every_n_steps),
    ]


def stateful_callbacks() -> list[L.Callback]:
    """Detection + ZClip: both keep state that a resume must restore."""
    from grad_guard import GradientAnomalyDetection, GradientClipping
    from grad_guard.core.clip import ZClip

    return [
        GradientAnomalyDetection(on_nonfinite="skip", spike_warmup_steps=2, spike_window=4),
        GradientClipping(ZClip(alpha=0.5, z_threshold=0.5, warmup_steps=2)),
    ]


def find_callback(trainer: L.Trainer, class_name: str) -> Any:
    return next(cb for cb in trainer.callbacks if type(cb).__name__ == class_name)


def callback_states(trainer: L.Trainer) -> dict[str, Any]:
    """The ``callbacks`` entry of the checkpoint this rank would write."""
    checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    return {k: v for k, v in checkpoint["callbacks"].items() if "StepMarker" not in k}


class StateProbe(L.Callback):
    """Copies the other grad_guard callbacks' states when training starts (after a
    checkpoint was restored) and when it ends."""

    def __init__(self) -> None:
        self.at_start: dict[str, Any] = {}
        self.at_end: dict[str, Any] = {}

    def _states(self, trainer: L.Trainer) -> dict[str, Any]:
        import copy

        return {
            cb.state_key: copy.deepcopy(cb.state_dict())
            for cb in trainer.callbacks
            if type(cb).__module__.startswith("grad_guard")
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_start = self._states(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.at_end = self._states(trainer)


def _resume(
    out_dir: str, rank: int, world_size: int, strategy: Any, module_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """1 epoch + checkpoint, resume to 2 epochs, and 2 epochs uninterrupted."""
    loader = regression_loader(batch_size=4, rank=rank, world_size=world_size)
    results: dict[str, Any] = {}
    ckpt = os.path.join(out_dir, "resume", "epoch1.ckpt")
    for name, epochs, ckpt_path in (
        ("first", 1, None),
        ("resumed", 2, ckpt),
        ("straight", 2, None),
    ):
        probe = StateProbe()
        trainer = make_trainer(
            os.path.join(out_dir, "resume", name),
            rank,
            strategy(),
            [*stateful_callbacks(), probe],
            max_steps=-1,
            max_epochs=epochs,
        )
        trainer.fit(make_module(**module_kwargs), loader, ckpt_path=ckpt_path)
        if name == "first":
            trainer.save_checkpoint(ckpt)
        results[name] = {
            "at_start": probe.at_start,
            "at_end": probe.at_end,
            "steps": trainer.global_step,
        }
    return results


def _loader(rank: int, world_size: int) -> Any:
    return regression_loader(batch_size=4, rank=rank, world_size=world_size)


def ddp_monitor(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """``GradientNormMonitor`` alone under ``strategy="ddp"``."""
    from grad_guard import GradientNormMonitor

    monitor = GradientNormMonitor(histogram_every_n_steps=2)
    trainer = make_trainer(os.path.join(out_dir, "ddp_monitor"), rank, "ddp", [monitor])
    return fit_and_measure(trainer, make_module(), _loader(rank, world_size))


def ddp_nan(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Monitor + detection + clipping under DDP; rank 1's loss is NaN at step 2."""
    trainer = make_trainer(os.path.join(out_dir, "ddp_nan"), rank, "ddp", guarded_callbacks())
    result = fit_and_measure(trainer, make_module(nan_loss_at=(1, 2)), _loader(rank, world_size))
    result["checkpoint_callbacks"] = callback_states(trainer)
    result["counts"] = dict(find_callback(trainer, "GradientAnomalyDetection").counts)
    return result


def ddp_rollback(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Detection with ``on_nonfinite="rollback"`` under DDP; rank 1's loss is NaN at step 2."""
    from grad_guard import GradientAnomalyDetection

    detection = GradientAnomalyDetection(
        on_nonfinite="rollback", snapshot_every_n_steps=1, spike_z_threshold=None
    )
    trainer = make_trainer(os.path.join(out_dir, "ddp_rollback"), rank, "ddp", [detection])
    result = fit_and_measure(trainer, make_module(nan_loss_at=(1, 2)), _loader(rank, world_size))
    result["counts"] = dict(detection.counts)
    result["restored"] = [e.restored_step for e in detection.events if e.kind == "nonfinite"]
    return result


def ddp_resume(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    return _resume(os.path.join(out_dir, "ddp_resume"), rank, world_size, lambda: "ddp", {})


def fsdp2_strategy() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def fsdp2_guarded(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Monitor (every 2 steps) + detection + NormClip under FSDP2."""
    out = os.path.join(out_dir, "fsdp2_guarded")
    trainer = make_trainer(out, rank, fsdp2_strategy(), guarded_callbacks(2))
    return fit_and_measure(trainer, make_module(fsdp2=True), _loader(rank, world_size))


def fsdp2_agc(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """AGC under FSDP2."""
    from grad_guard import GradientClipping
    from grad_guard.core.clip import AGC

    agc = GradientClipping(AGC(clip_factor=0.01))
    trainer = make_trainer(os.path.join(out_dir, "fsdp2_agc"), rank, fsdp2_strategy(), [agc])
    return fit_and_measure(trainer, make_module(fsdp2=True), _loader(rank, world_size))


def fsdp2_nonfinite(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """Under FSDP2, +inf in rank 1's gradient shard of ``net.2.weight`` at step 1."""
    out = os.path.join(out_dir, "fsdp2_nonfinite")
    trainer = make_trainer(out, rank, fsdp2_strategy(), guarded_callbacks())
    module = make_module(fsdp2=True, inf_grad_at=(1, 1, 2))
    result = fit_and_measure(trainer, module, _loader(rank, world_size))
    result["counts"] = dict(find_callback(trainer, "GradientAnomalyDetection").counts)
    result["checkpoint_callbacks"] = callback_states(trainer)
    return result


def fsdp2_resume(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    out = os.path.join(out_dir, "fsdp2_resume")
    return _resume(out, rank, world_size, fsdp2_strategy, {"fsdp2": True})


# ---------------------------------------------------------------------------- FSDP1


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1) on CPU with gloo, for tests.

    Lightning refuses ``strategy="fsdp"`` without a GPU accelerator but accepts a subclass;
    torch's FSDP1 runs on CPU when it is given ``device_id=cpu``, which Lightning does not
    pass. Everything else (sharding, flat parameters, ``use_orig_params``) is the real
    thing.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


def fsdp1_full_state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, torch.Tensor]:
    """Full parameters of an FSDP1 model, under their unwrapped names (all ranks call it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
        return {
            name.replace("_fsdp_wrapped_module.", ""): p.detach().clone().cpu()
            for name, p in module.named_parameters()
        }


def group_layers(trainer: L.Trainer) -> list[Any]:
    """The layers grad_guard forms for the Trainer's first optimizer."""
    from grad_guard.core.layers import group_parameters, optimizer_parameters

    params = optimizer_parameters(trainer.optimizers[0].param_groups)
    return group_parameters(trainer.lightning_module, parameters=params)


def fsdp1(
    rank: int, world_size: int, out_dir: str, use_orig_params: bool, accelerator: str = "cpu"
) -> dict[str, Any]:
    """Monitor (every 2 steps) + detection + NormClip under FSDP1, one unit per ``Linear``."""
    strategy_class = CPUFSDPStrategy if accelerator == "cpu" else FSDPStrategy
    strategy = strategy_class(auto_wrap_policy={nn.Linear}, use_orig_params=use_orig_params)
    trainer = make_trainer(
        os.path.join(out_dir, f"fsdp1_{use_orig_params}"),
        rank,
        strategy,
        guarded_callbacks(2),
        accelerator=accelerator,
        devices=world_size,
    )
    result = fit_and_measure(
        trainer, make_module(), _loader(rank, world_size), weights=fsdp1_full_state
    )
    result["layer_names"] = [layer.name for layer in group_layers(trainer)]
    return result


def fsdp1_orig(rank: int, world_size: int, out_dir: str, accelerator: str = "cpu") -> dict:
    return fsdp1(rank, world_size, out_dir, use_orig_params=True, accelerator=accelerator)


def fsdp1_flat(rank: int, world_size: int, out_dir: str, accelerator: str = "cpu") -> dict:
    return fsdp1(rank, world_size, out_dir, use_orig_params=False, accelerator=accelerator)


# ---------------------------------------------------------------------------- core only


def dtensor(rank: int, world_size: int, out_dir: str) -> dict:
    """``LayerNormComputer`` on hand-made ``DTensor``s and flat shards (no Lightning).

    Returns ``{case: (norms on this rank, collectives, norms of the full tensors)}``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from grad_guard.core.stats import LayerNormComputer

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(shape, generator=generator) for shape in ((7, 5), (7,), (3, 7), (1, 3))]
    layers = [[0, 1], [2, 3]]  # two layers of two tensors each

    def expected(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
        return torch.stack(
            [
                torch.linalg.vector_norm(torch.cat([tensors[i].flatten() for i in layer]), p)
                for layer in layers
            ]
        )

    def measure(tensors: list[Any], p: float = 2.0, **kwargs: Any) -> tuple[torch.Tensor, int]:
        computer = LayerNormComputer(len(layers), p, **kwargs)
        norms = computer([[tensors[i] for i in layer] for layer in layers])
        return norms, computer.collectives_last_call

    results: dict[str, Any] = {}
    replicated = [distribute_tensor(t, mesh, [Replicate()]) for t in full]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]  # 7, 3, 1 rows: uneven
    last_dim = [distribute_tensor(t, mesh, [Shard(t.ndim - 1)]) for t in full]
    for p in (1.0, 2.0, math.inf):
        results[f"replicated, p={p}"] = (*measure(replicated, p), expected(full, p))
        results[f"sharded, p={p}"] = (*measure(sharded, p), expected(full, p))
    mixed = [sharded[0], replicated[1], last_dim[2], replicated[3]]
    results["replicated and sharded in one layer"] = (*measure(mixed), expected(full, 2.0))

    # a NaN in rank 1's shard only: every rank must see a non-finite norm, for every p
    poisoned = full[2].clone()
    poisoned[2, 0] = float("nan")  # row 2 of 3 lives on rank 1
    tensors = [sharded[0], sharded[1], distribute_tensor(poisoned, mesh, [Shard(0)]), sharded[3]]
    for p in (2.0, math.inf):
        results[f"nan in rank 1's shard, p={p}"] = (*measure(tensors, p), None)

    # FSDP1-style flat shards over a process group: rank 0 holds nothing of layer 1, and
    # in the last case nothing at all, and still joins the all-reduce
    flat = [t.flatten() for t in full]
    mine = [t.tensor_split(world_size)[rank] for t in flat]
    mine[2], mine[3] = (flat[2][:0], flat[3][:0]) if rank == 0 else (flat[2], flat[3])
    group = dist.group.WORLD
    for p in (2.0, 3.0, math.inf):
        results[f"flat shards, p={p}"] = (
            *measure(mine, p, process_group=group),
            expected(full, p),
        )
    nothing = [t[:0] for t in flat] if rank == 0 else flat
    results["flat shards, rank 0 holds nothing"] = (
        *measure(nothing, process_group=group),
        expected(full, 2.0),
    )
    return results


PARTS: dict[str, Callable[..., Any]] = {
    part.__name__: part
    for part in (
        ddp_monitor,
        ddp_nan,
        ddp_rollback,
        ddp_resume,
        fsdp1_orig,
        fsdp1_flat,
        fsdp2_guarded,
        fsdp2_agc,
        fsdp2_nonfinite,
        fsdp2_resume,
        dtensor,
    )
}


def scenario(
    rank: int, world_size: int, out_dir: str, parts: tuple[str, ...], **kwargs: Any
) -> dict[str, Any]:
    """Run the named parts (see :data:`PARTS`) one after the other in this rank."""
    return {name: PARTS[name](rank, world_size, out_dir, **kwargs) for name in parts}
