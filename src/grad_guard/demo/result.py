"""``ExperimentResult``: what one training run of the demo measured."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from grad_guard.demo.experiment import Experiment

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class ExperimentResult:
    """What :func:`run_experiment` measured.

    Attributes:
        experiment: the configuration that ran.
        grad_ratio: first/last weight-layer gradient-norm ratio at step 0, before any
            update (see :func:`probe_gradients`).
        first_layer: name of the first weight layer.
        last_layer: name of the last weight layer.
        initial_grad_norms: per-layer gradient norms at step 0.
        diverged_at: 0-based index of the first training step whose loss was NaN/Inf,
            ``None`` if the loss stayed finite.
        nonfinite_steps: how many training steps had a non-finite loss.
        train_accuracy: accuracy on the whole dataset after training (eval mode).
        final_loss: cross-entropy on the whole dataset after training (may be NaN).
        loss_history: the training loss of every step run.
        grad_norm_history: the total gradient norm (2-norm over all parameters) of every
            step, before any clipping; NaN/Inf where the gradient was non-finite.
        steps_run: training steps actually run (fewer than asked when a run that had
            diverged was stopped).
        wall_time_s: seconds spent in ``Trainer.fit``.
        log_dir: the TensorBoard directory of this run.
        clipped_by: ``"trainer"`` when the runner applied Lightning's clipping,
            ``"callbacks"`` when the algorithm was left to the caller's callbacks,
            ``None`` without clipping.
        extras: free-form values for the caller (the demo stores what its callbacks saw).
        model: the trained model (left out of :meth:`to_dict`).
    """

    experiment: Experiment
    grad_ratio: float
    first_layer: str
    last_layer: str
    initial_grad_norms: dict[str, float]
    diverged_at: int | None
    nonfinite_steps: int
    train_accuracy: float
    final_loss: float
    loss_history: list[float]
    grad_norm_history: list[float]
    steps_run: int
    wall_time_s: float
    log_dir: str
    clipped_by: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def diverged(self) -> bool:
        """Whether the loss became non-finite."""
        return self.diverged_at is not None

    @property
    def max_grad_norm(self) -> float:
        """The largest finite total gradient norm seen during training (0.0 if none)."""
        return max((g for g in self.grad_norm_history if math.isfinite(g)), default=0.0)

    def summary(self) -> str:
        """One line: name, ratio, divergence and accuracy."""
        diverged = "-" if self.diverged_at is None else f"step {self.diverged_at}"
        return (
            f"{self.name:<24} ratio {self.grad_ratio:9.2e}  max |g| {self.max_grad_norm:9.2e}  "
            f"diverged {diverged:<9} acc {self.train_accuracy:6.1%}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values, ready for ``json.dump`` (non-finite floats stay floats)."""
        data = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("experiment", "model")
        }
        data["experiment"] = self.experiment.to_dict()
        return data
