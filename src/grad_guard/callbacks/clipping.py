"""``AdaptiveGradientClipping``: run one clipping algorithm every optimizer step."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from grad_guard._validation import check_int
from grad_guard.callbacks import shared_pass
from grad_guard.callbacks.base import GradGuardCallback, is_logging_step
from grad_guard.callbacks.strategy import flat_shard_group
from grad_guard.core.clip import (
    ClipAlgorithm,
    ClipResult,
    ClipShortcut,
    resolve_algorithm,
)
from grad_guard.loggers import (
    clip_metrics,
    clipping_charts,
    log_scalars,
    warn_rank_zero,
    write_layout,
)

_UNKNOWN = object()


class AdaptiveGradientClipping(GradGuardCallback):
    r"""Clip the gradients with one algorithm every optimizer step, and log what it did.

    Clips in ``on_before_optimizer_step``: there the gradients of all micro-batches are
    accumulated and already unscaled under ``16-mixed``, and Lightning's own
    ``gradient_clip_val`` clipping has not run yet. The norms come from grad_guard's
    shared statistics pass, so together with ``GradientNormMonitor`` or
    ``GradientAnomalyDetection`` the gradients are read once for the norms; the
    statistics other callbacks see are those of the raw (pre-clip) gradients. When
    anomaly detection has already dropped the step (``on_nonfinite="skip"``), nothing
    is clipped or recorded.

    Each optimizer gets its own copy of the algorithm (its own statistics), keyed by its
    index in ``trainer.optimizers``; the first optimizer uses the object passed in. With
    manual optimization the hook fires on every ``optimizer.step()``. Under DDP the
    gradients are all-reduced before the hook, so every rank computes the same threshold;
    under FSDP2 the norms are those of the full, unsharded gradients.

    Nothing here waits for the accelerator between logging steps: thresholds, statistics
    and the count of clipped steps stay device tensors. On a logging step one small
    tensor is copied to the host and these scalars are logged (with several optimizers,
    with an ``optimizer_<i>/`` level after ``grad_guard/``):

    - ``grad_guard/clip/pre_norm``: total gradient norm before clipping.
    - ``grad_guard/clip/post_norm``: total gradient norm after clipping.
    - ``grad_guard/clip/threshold``: the bound in force (a norm for ``norm``,
      ``autoclip``, ``zscore``; the element bound for ``value``; ``clip_factor`` for
      ``agc``). Not logged while it is infinite (ZClip's warm-up) or NaN.
    - ``grad_guard/clip/clipped_fraction``: fraction of the steps since the previous
      logging step (this one included) that were clipped.

    The algorithms' statistics (AutoClip's history, ZClip's EMAs and warm-up) and the
    counters are saved in the checkpoint and restored on resume.

    Args:
        algorithm: a :class:`~grad_guard.core.clip.ClipAlgorithm` object
            (``NormClip(1.0)``, ``ValueClip(0.5)``, ``AutoClip()``, ``ZClip()``,
            ``AGC()``), or a shortcut with defaults: ``"norm"`` (``NormClip(1.0)``),
            ``"value"`` (``ValueClip(1.0)``), ``"autoclip"``, ``"zscore"`` (``ZClip()``,
            the default) or ``"agc"``.
        log_every_n_steps: log every N optimizer steps (step 0 included); ``None`` uses
            the Trainer's ``log_every_n_steps``.

    Raises:
        ValueError: if ``algorithm`` is not an algorithm or a known shortcut, or
            ``log_every_n_steps`` is not a positive int.

    Example::

        from lightning.pytorch import Trainer
        from grad_guard import AdaptiveGradientClipping, ZClip

        trainer = Trainer(callbacks=[AdaptiveGradientClipping(ZClip(z_threshold=2.5))])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: grad_guard.AdaptiveGradientClipping
              init_args:
                algorithm:
                  class_path: grad_guard.core.clip.AutoClip
                  init_args: {percentile: 10.0}

    >>> AdaptiveGradientClipping("zclip")
    Traceback (most recent call last):
    ...
    ValueError: `algorithm` must be one of 'norm', 'value', 'autoclip', 'zscore', 'agc', got 'zclip'
    """

    def __init__(
        self,
        algorithm: ClipAlgorithm | ClipShortcut = "zscore",
        log_every_n_steps: int | None = None,
    ) -> None:
        resolved = resolve_algorithm(algorithm)
        super().__init__(granularity=resolved.granularity, norm_type=resolved.norm_type)
        self.algorithm = resolved
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self._template = copy.deepcopy(resolved)
        self._algorithms: dict[int, ClipAlgorithm] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        # optimizer index -> (steps, clipped steps) at its previous logging step
        self._at_last_log: dict[int, tuple[int, Tensor]] = {}
        self._warned_double_clipping = False
        self._shard_group: Any = _UNKNOWN

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._shard_group = _UNKNOWN

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            algorithm=repr(self._template), log_every_n_steps=self.log_every_n_steps
        )

    @property
    def algorithms(self) -> dict[int, ClipAlgorithm]:
        """The algorithm of each optimizer that has stepped, by index in ``trainer.optimizers``."""
        return dict(self._algorithms)

    @property
    def steps(self) -> int:
        """Optimizer steps clipped (or checked) so far, all optimizers together."""
        return sum(a.steps for a in self._algorithms.values())

    @property
    def clipped_fraction(self) -> float:
        """Fraction of all optimizer steps so far that were clipped (one host copy)."""
        steps = self.steps
        if not steps:
            return 0.0
        clipped = sum(int(a.clipped_steps) for a in self._algorithms.values())
        return clipped / steps

    def layout_charts(self) -> dict[str, list[str]]:
        return clipping_charts()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val and not self._warned_double_clipping:
            self._warned_double_clipping = True
            warn_rank_zero(
                f"grad_guard: AdaptiveGradientClipping({self.algorithm!r}) and "
                f"Trainer(gradient_clip_val={clip_val}) both clip: Lightning clips again after "
                "this callback. Remove `gradient_clip_val` (or use NormClip here).",
            )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        # other grad_guard callbacks measuring differently must see the raw gradients too
        shared_pass.raw_passes_first(trainer, pl_module, optimizer)
        context = self.step_context(trainer, pl_module, optimizer)
        if context.skipped:
            return
        index = _optimizer_index(trainer, optimizer)
        algorithm = self._algorithm(index)
        if self._shard_group is _UNKNOWN:
            self._shard_group = flat_shard_group(trainer)
        algorithm.process_group = self._shard_group  # FSDP1: gradients are flat slices
        algorithm.bind(pl_module)
        result = algorithm.clip_stats(context.stats)
        context.post_clip_total_norm = result.post_norm
        context.clip_threshold = result.threshold
        if is_logging_step(trainer, self.log_every_n_steps):
            try:
                self._log(trainer, optimizer, index, algorithm, result)
            except Exception as err:  # logging must never kill training
                warn_rank_zero(f"grad_guard: could not log clipping this step ({err!r}).")

    def _algorithm(self, index: int) -> ClipAlgorithm:
        algorithm = self._algorithms.get(index)
        if algorithm is None:
            algorithm = self.algorithm if index == 0 else copy.deepcopy(self._template)
            if index in self._pending:
                algorithm.load_state_dict(self._pending.pop(index))
            self._algorithms[index] = algorithm
            self._at_last_log[index] = (algorithm.steps, algorithm.clipped_steps)
        return algorithm

    def _log(
        self,
        trainer: Any,
        optimizer: Optimizer,
        index: int,
        algorithm: ClipAlgorithm,
        result: ClipResult,
    ) -> None:
        last_steps, last_clipped = self._at_last_log[index]
        clipped_now = algorithm.clipped_steps
        since = clipped_now - last_clipped.to(clipped_now.device)
        packed = torch.stack(
            [
                result.pre_norm.float(),
                result.post_norm.float().to(result.pre_norm.device),
                result.threshold.float().to(result.pre_norm.device),
                since.float().to(result.pre_norm.device),
            ]
        )
        pre, post, threshold, clipped = packed.cpu().tolist()
        self._at_last_log[index] = (algorithm.steps, clipped_now)
        label = shared_pass.optimizer_label(trainer, optimizer)
        fraction = clipped / max(algorithm.steps - last_steps, 1)
        metrics = clip_metrics(pre, post, threshold, fraction, label)
        write_layout(trainer)
        log_scalars(trainer, metrics, shared_pass.training_step(trainer))

    def state_dict(self) -> dict[str, Any]:
        states = {index: state for index, state in self._pending.items()}
        for index, algorithm in self._algorithms.items():
            states[index] = algorithm.state_dict()
        return {"algorithms": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Forget what was learnt since construction (an LR finder's search restores a
        # checkpoint taken before any step): optimizers without saved state start fresh.
        self.algorithm.load_state_dict(self._template.state_dict())
        self._algorithms = {}
        self._at_last_log = {}
        self._pending = dict(state_dict.get("algorithms", {}))


def _optimizer_index(trainer: Any, optimizer: Optimizer) -> int:
    """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is not found)."""
    inner = getattr(optimizer, "_optimizer", optimizer)
    for index, candidate in enumerate(getattr(trainer, "optimizers", []) or []):
        if candidate is optimizer or candidate is inner:
            return index
        if getattr(candidate, "optimizer", None) is inner:
            return index
    return 0
