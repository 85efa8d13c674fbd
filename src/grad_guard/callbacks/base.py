"""What every grad_guard callback shares: registration with the session, the hooks."""

from __future__ import annotations

import json
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer

from grad_guard._validation import check_int
from grad_guard.callbacks.session import GuardSession
from grad_guard.callbacks.strategy import check_strategy
from grad_guard.core.engine import StepOutcome
from grad_guard.loggers import tensorboard_writers, warn_if_no_logger

CONFIG_TEXT_TAG = "grad_guard/config"
_MIN_LOGGED_STEPS = 10  # fewer logged steps than this over a run say too little
_MIN_ADVISED_RUN = 100  # shorter runs are smoke tests: no advice on their interval


class GradGuardCallback(Callback):
    """Base of grad_guard's Lightning callbacks (not meant to be used directly).

    A subclass holds one part of the step engine (:meth:`engine_part`) under a
    :attr:`role`; at ``setup`` it registers with the Trainer's
    :class:`~grad_guard.callbacks.session.GuardSession`, which runs one engine for all
    registered parts. The first registered callback forwards the hooks; every callback
    sees each step's outcome in :meth:`after_outcome`.

    Args:
        log_every_n_steps: logging interval; ``None`` uses the Trainer's.

    Raises:
        ValueError: if ``log_every_n_steps`` is not a positive int or ``None``.
    """

    is_grad_guard = True
    role = ""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self._session: GuardSession | None = None

    # -------------------------------------------------------- for subclasses

    def engine_part(self) -> Any:
        """The part this callback contributes to the step engine."""
        raise NotImplementedError

    def after_outcome(self, trainer: Any, outcome: StepOutcome) -> None:
        """See one step's outcome (after the session has logged it)."""

    def interval(self, trainer: Any) -> int:
        """The logging interval, defaulting to the Trainer's ``log_every_n_steps``."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def is_logging_step(self, trainer: Any, log_step: int) -> bool:
        return log_step % self.interval(trainer) == 0

    def run_config(self) -> dict[str, Any]:
        """This part's entry in the ``grad_guard/config`` text the run logs."""
        return {}

    # ---------------------------------------------------------------- hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_strategy(getattr(trainer, "strategy", None), getattr(trainer, "callbacks", ()))
        if stage == "fit":
            self._session = GuardSession.of(trainer)
            self._session.register(self.role, self)

    def _driving(self) -> bool:
        session = self._session
        return session is not None and next(iter(session.callbacks.values()), None) is self

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._driving() or self._session is None:
            return
        warn_if_no_logger(trainer)
        self._session.fit_start(trainer, pl_module)
        _warn_if_few_logged_steps(trainer, self._session)
        _write_run_config(trainer, self._session)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._driving() and self._session is not None:
            self._session.batch_start(batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if self._driving() and self._session is not None:
            self._session.before_backward(loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        if self._session is not None:
            self._session.before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if self._driving() and self._session is not None:
            self._session.train_batch_end()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._driving() and self._session is not None:
            self._session.flush(trainer)

    def flush(self, trainer: Any = None) -> None:
        """Read flags and update ratios still pending on the device (local, no collective)."""
        if self._session is not None and trainer is not None:
            self._session.flush(trainer)

    def __getstate__(self) -> dict[str, Any]:
        # the session holds device state and the Trainer's engine: it is rebuilt at setup
        state = self.__dict__.copy()
        state["_session"] = None
        return state


def _warn_if_few_logged_steps(trainer: Any, session: GuardSession) -> None:
    total = getattr(trainer, "estimated_stepping_batches", None)
    try:
        total = int(total) if total is not None and total != float("inf") else None
    except (TypeError, ValueError, OverflowError):
        total = None
    if not total or total < _MIN_ADVISED_RUN:
        return
    for callback in session.callbacks.values():
        interval = callback.interval(trainer)
        logged = (total - 1) // interval + 1
        better = max(1, total // (5 * _MIN_LOGGED_STEPS))
        if logged < _MIN_LOGGED_STEPS and better < interval:
            rank_zero_warn(
                f"grad_guard: {type(callback).__name__} logs every {interval} steps, so this "
                f"run of {total} optimizer steps gives only {logged} logged step(s). Pass "
                f"`log_every_n_steps={better}` to the callback (or to the Trainer) to see "
                "how the gradients evolve."
            )
            return


def run_config(trainer: Any, session: GuardSession) -> dict[str, Any]:
    """The run's grad_guard settings (the ``grad_guard/config`` contract)."""
    config: dict[str, Any] = {
        "version": 1,
        "precision": str(getattr(trainer, "precision", "32-true")),
        "log_every_n_steps": min(cb.interval(trainer) for cb in session.callbacks.values()),
        "monitor": "monitor" in session.callbacks,
        "activations": "activations" in session.callbacks,
        "detection": None,
        "clipping": None,
    }
    for callback in session.callbacks.values():
        config.update(callback.run_config())
    return config


def _write_run_config(trainer: Any, session: GuardSession) -> None:
    """The run's grad_guard settings as TensorBoard text, for reports and the dashboard."""
    config = run_config(trainer, session)
    try:
        for writer in tensorboard_writers(trainer):
            writer.add_text(CONFIG_TEXT_TAG, json.dumps(config), global_step=0)
    except Exception as err:  # logging must never kill training
        rank_zero_warn(f"grad_guard: could not log the run configuration ({err!r}).")
