"""What every grad_guard callback shares: the hook point, the shared pass, the logging step."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback
from torch.optim import Optimizer

from grad_guard.callbacks import shared_pass
from grad_guard.callbacks.strategy import check_strategy
from grad_guard.core.layers import Granularity, validate_granularity
from grad_guard.core.stats import NormType, validate_norm_type
from grad_guard.loggers import warn_if_no_logger, warn_rank_zero


class GradGuardCallback(Callback):
    """Base for grad_guard's Lightning callbacks (not meant to be used directly).

    Args:
        granularity: how parameters form layers (see
            :func:`grad_guard.core.layers.group_parameters`).
        norm_type: p of the gradient p-norm (``2.0``, ``1.0``, ``float("inf")``, ``"inf"``).
    """

    def __init__(self, granularity: Granularity = "module", norm_type: NormType = 2.0) -> None:
        super().__init__()
        self.granularity = validate_granularity(granularity)
        self.norm_type = validate_norm_type(norm_type)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_strategy(getattr(trainer, "strategy", None), getattr(trainer, "callbacks", ()))
        if stage == "fit":
            shared_pass.reset(trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        warn_if_no_logger(trainer)
        _warn_if_fused_under_amp(trainer)

    def step_context(
        self, trainer: Any, pl_module: Any, optimizer: Optimizer
    ) -> shared_pass.StepContext:
        """This step's shared statistics (computed on first use within the step)."""
        return shared_pass.step_context(
            trainer, pl_module, optimizer, self.granularity, self.norm_type
        )

    def layout_charts(self) -> dict[str, list[str]]:
        """Custom-scalars charts this callback wants: title -> tag regexes."""
        return {}


_warned_fused: set[int] = set()


def _warn_if_fused_under_amp(trainer: Any) -> None:
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None:
        return
    for optimizer in getattr(trainer, "optimizers", []):
        if (
            getattr(optimizer, "_step_supports_amp_scaling", False)
            and id(optimizer) not in _warned_fused
        ):
            _warned_fused.add(id(optimizer))
            warn_rank_zero(
                f"grad_guard: {type(optimizer).__name__} unscales gradients inside `step()` "
                "(fused optimizer), so at `on_before_optimizer_step` the gradients are still "
                "multiplied by the GradScaler's scale: logged norms are scaled and clipping "
                "thresholds act on scaled values. Use `fused=False` for correct numbers.",
            )


def log_interval(trainer: Any, log_every_n_steps: int | None) -> int:
    """The callback's interval, defaulting to the Trainer's ``log_every_n_steps``."""
    if log_every_n_steps is not None:
        return log_every_n_steps
    return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))


def is_logging_step(trainer: Any, log_every_n_steps: int | None) -> bool:
    return shared_pass.training_step(trainer) % log_interval(trainer, log_every_n_steps) == 0
