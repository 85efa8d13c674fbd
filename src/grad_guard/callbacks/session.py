"""One :class:`~grad_guard.core.engine.StepEngine` per Trainer, shared by its grad_guard callbacks.

Every grad_guard callback on a Trainer registers its part (monitor, detection,
clipping) with the Trainer's :class:`GuardSession` at ``setup``. The session builds one
engine from all registered parts, so stand-alone callbacks used together, and
``GradGuard``, read the gradients once per optimizer step. The first callback whose
``on_before_optimizer_step`` runs in a step drives the engine; the others find the step
done. The session lives on the Trainer as ``trainer.grad_guard_session``.

This module translates between Lightning and the engine and nothing more: step numbers,
optimizers, the GradScaler, the loss, ranks, loggers and ``trainer.should_stop``.
"""

from __future__ import annotations

import weakref
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from grad_guard.callbacks.strategy import flat_shard_group
from grad_guard.callbacks.trainer_facts import (
    amp_overflow,
    max_reducer,
    mean_over_ranks,
    optimizer_index,
    optimizer_label_of,
    scaler_of,
    someone_needs_clipped_grads,
    training_step,
    unscaled,
)
from grad_guard.core.engine import StepEngine, StepOutcome, StepRequest
from grad_guard.core.events import GradientAnomalyError, GradientAnomalyWarning
from grad_guard.core.fused import is_fused
from grad_guard.core.layers import optimizer_layers, optimizer_parameters, parameters_signature
from grad_guard.core.rollback import RecoveryTargets
from grad_guard.loggers import (
    log_scalars,
    tensorboard_writers,
    warn_rank_zero,
    write_layout,
)

EVENTS_TEXT_TAG = "grad_guard/anomaly_events"
SESSION_ATTRIBUTE = "grad_guard_session"


class GuardSession:
    """The grad_guard state of one Trainer: registered callbacks and the step engine."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Any] = {}  # role -> callback
        self.engine: StepEngine | None = None
        self._done: dict[int, int] = {}  # id(optimizer) -> global_step already run
        self._stepped: set[int] = set()  # optimizer indices stepped this batch
        self._loss: Tensor | None = None
        self._batch_index: int | None = None
        self._fold_allowed = True
        self._fused_said = False
        self.saved_detectors: dict[Any, Any] = {}  # restored from a checkpoint
        self.trainer: Any = lambda: None  # weak reference, set by `of`

    @staticmethod
    def of(trainer: Any) -> GuardSession:
        """The session of ``trainer``, created on first use."""
        session = getattr(trainer, SESSION_ATTRIBUTE, None)
        if not isinstance(session, GuardSession):
            session = GuardSession()
            session.trainer = weakref.ref(trainer)
            setattr(trainer, SESSION_ATTRIBUTE, session)
        return session

    def register(self, role: str, callback: Any) -> None:
        """Add a callback's part; one callback per role (monitor, detection, clipping).

        Raises:
            ValueError: if another callback already holds ``role``.
        """
        known = self.callbacks.get(role)
        if known is not None and known is not callback:
            raise ValueError(
                f"grad_guard: two callbacks on one Trainer want the {role} part "
                f"({type(known).__name__} and {type(callback).__name__}); keep one"
            )
        self.callbacks[role] = callback
        if self.engine is not None:  # a new fit: unhook the old engine from its optimizers
            self.engine.reset()
        self.engine = None  # rebuilt from all parts at the first step

    def part(self, role: str) -> Any:
        callback = self.callbacks.get(role)
        return None if callback is None else callback.engine_part()

    def _engine(self) -> StepEngine:
        if self.engine is None:
            self.engine = StepEngine(
                self.part("monitor"), self.part("detection"), self.part("clipping")
            )
            if self.saved_detectors:
                self.engine.load_detector_states(self.saved_detectors)
                self.saved_detectors = {}
            self._done = {}
        return self.engine

    # ------------------------------------------------------------------ hooks

    def fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Decide once whether clipping and skipping fold into fused optimizers; say it."""
        self._fold_allowed = not someone_needs_clipped_grads(trainer, pl_module)
        fused = [type(o).__name__ for o in getattr(trainer, "optimizers", []) if is_fused(o)]
        if fused and not self._fused_said:
            self._fused_said = True
            how = (
                "folded into the optimizer's kernel (grad_scale/found_inf): no extra pass"
                if self._fold_allowed
                else "applied by multiplying the gradients, because something after "
                "grad_guard reads them (gradient_clip_val or another on_before_optimizer_step)"
            )
            rank_zero_info(f"grad_guard: fused {', '.join(fused)}: clipping and skipping are {how}.")

    def batch_start(self, batch_index: int) -> None:
        """Remember which batch of the epoch this is (bad batches are skipped by index)."""
        self._batch_index = int(batch_index)

    def before_backward(self, loss: Tensor) -> None:
        """Keep the loss of the step (summed over accumulated micro-batches)."""
        if isinstance(loss, Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss

    def before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        """Run the engine once for this optimizer step and translate its outcome."""
        step = int(trainer.global_step)
        engine = self._engine()
        if self._done.get(id(optimizer)) == step:
            return
        self._done[id(optimizer)] = step
        index = optimizer_index(trainer, optimizer)
        self._stepped.add(index)
        try:
            request = self._request(trainer, pl_module, optimizer, index, step)
            outcome = engine.step(request)
        except GradientAnomalyError:
            raise
        except Exception as err:  # a failure inside grad_guard never kills the run
            warn_rank_zero(
                f"grad_guard: this step's checks failed and were skipped ({type(err).__name__}: "
                f"{err}); the gradients were left as they are. Training continues."
            )
            return
        self.emit(trainer, outcome)

    def train_batch_end(self) -> None:
        """After the optimizer steps of a batch: measure the update of a logging step."""
        self._loss = None
        if self.engine is None:
            return
        for index in self._stepped:
            try:
                self.engine.after_step(index)
            except Exception as err:
                warn_rank_zero(f"grad_guard: could not measure the update ratio ({err!r}).")
        self._stepped = set()

    def flush(self, trainer: Any) -> None:
        """Read what is still pending on the device (end of training, before a save)."""
        if self.engine is None:
            return
        for index in list(self.engine._tracks):
            label = optimizer_label_of(trainer, index)
            try:
                outcome = self.engine.flush(index, label)
            except Exception as err:
                warn_rank_zero(f"grad_guard: could not read the pending flags ({err!r}).")
                continue
            self.emit(trainer, outcome)

    # ------------------------------------------------------------------ translation

    def _request(
        self, trainer: Any, pl_module: Any, optimizer: Optimizer, index: int, step: int
    ) -> StepRequest:
        groups = optimizer.param_groups
        log_step = training_step(trainer)
        scaler = scaler_of(trainer)
        still_scaled = scaler is not None and is_fused(optimizer) and not unscaled(scaler, optimizer)
        return StepRequest(
            module=pl_module,
            key=index,
            label=optimizer_label_of(trainer, index),
            layers=lambda granularity: optimizer_layers(pl_module, groups, granularity),
            signature=parameters_signature(groups),
            params=optimizer_parameters(groups),
            step=step,
            log_step=log_step,
            logging=any(
                cb.is_logging_step(trainer, log_step) for cb in self.callbacks.values()
            ),
            optimizer=optimizer,
            fold_allowed=self._fold_allowed,
            first=index == 0,
            amp_overflow=amp_overflow(scaler, optimizer),
            grad_scale=scaler._scale if still_scaled else None,
            loss=mean_over_ranks(trainer, self._loss) if "detection" in self.callbacks else None,
            reduce=max_reducer(trainer),
            process_group=flat_shard_group(trainer),
            batch_index=self._batch_index,
            targets=lambda: RecoveryTargets(
                modules=[pl_module],
                optimizers=list(trainer.optimizers),
                schedulers=[c.scheduler for c in getattr(trainer, "lr_scheduler_configs", [])],
            ),
        )

    def emit(self, trainer: Any, outcome: StepOutcome) -> None:
        """Say, write and act on what the engine decided (its actions are applied)."""
        if outcome.should_stop:
            trainer.should_stop = True
        if outcome.error is not None:
            err = outcome.error
            warn_rank_zero(
                f"grad_guard: this step's checks failed and were skipped ({type(err).__name__}: "
                f"{err}); the gradients were left as they are. Training continues."
            )
        for message in outcome.decision.warnings:
            rank_zero_warn(message, category=GradientAnomalyWarning)
        try:
            writers = tensorboard_writers(trainer)
            for event in outcome.decision.events:
                for writer in writers:
                    writer.add_text(EVENTS_TEXT_TAG, event.markdown(), global_step=event.step)
            if outcome.metrics:
                write_layout(trainer)
            for log_step, metrics in outcome.metrics:
                log_scalars(trainer, metrics, log_step)
            for callback in self.callbacks.values():
                callback.after_outcome(trainer, outcome)
        except Exception as err:  # logging must never kill training
            warn_rank_zero(f"grad_guard: could not log this step ({type(err).__name__}: {err}).")
