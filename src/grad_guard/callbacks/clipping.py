"""``GradientClipping``: run one clipping algorithm every optimizer step."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from grad_guard.callbacks.base import GradGuardCallback
from grad_guard.core.clip import ClipAlgorithm, ClipShortcut, resolve_algorithm
from grad_guard.core.parts import ClippingPart
from grad_guard.loggers import clipping_charts, warn_rank_zero


class GradientClipping(GradGuardCallback):
    r"""Clip the gradients with one algorithm every optimizer step, and log what it did.

    Clips in ``on_before_optimizer_step``: there the gradients of all micro-batches are
    accumulated and already unscaled under ``16-mixed``, and Lightning's own
    ``gradient_clip_val`` clipping has not run yet. The norms come from grad_guard's
    shared statistics pass, so together with ``GradientNormMonitor`` or
    ``GradientAnomalyDetection`` the gradients are read once for the norms; the
    statistics other callbacks see are those of the raw (pre-clip) gradients.

    With a fused optimizer (``fused=True`` Adam, AdamW, SGD) a clip by one factor
    (``NormClip``, ``AutoClip``, ``ZClip``) is folded into the optimizer's kernel (its
    ``grad_scale``, composed with a GradScaler's): no extra pass over the gradients.
    When something after grad_guard must see the clipped gradients (Lightning's
    ``gradient_clip_val``, another callback's ``on_before_optimizer_step``, the
    module's ``configure_gradient_clipping``) the gradients are multiplied instead; which
    path is in force is said once at fit start. Per-tensor algorithms (``ValueClip``,
    ``AGC``, ``NormClip(per_parameter=True)``) always clip in place.

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
        from grad_guard import GradientClipping, ZClip

        trainer = Trainer(callbacks=[GradientClipping(ZClip(z_threshold=2.5))])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: grad_guard.GradientClipping
              init_args:
                algorithm:
                  class_path: grad_guard.core.clip.AutoClip
                  init_args: {percentile: 10.0}

    >>> GradientClipping("zclip")
    Traceback (most recent call last):
    ...
    ValueError: `algorithm` must be one of 'norm', 'value', 'autoclip', 'zscore', 'agc', got 'zclip'
    """

    role = "clipping"

    def __init__(
        self,
        algorithm: ClipAlgorithm | ClipShortcut = "zscore",
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(log_every_n_steps)
        self.algorithm = resolve_algorithm(algorithm)
        self.granularity = self.algorithm.granularity
        self.norm_type = self.algorithm.norm_type
        self._part = ClippingPart(self.algorithm)
        self._warned_double_clipping = False

    @property
    def state_key(self) -> str:
        # the class is what identifies it: a resume with another algorithm keeps going
        return "GradientClipping"

    @property
    def algorithms(self) -> dict[int, ClipAlgorithm]:
        """The algorithm of each optimizer that has stepped, by index in ``trainer.optimizers``."""
        return dict(self._part.algorithms)

    @property
    def steps(self) -> int:
        """Optimizer steps clipped (or checked) so far, all optimizers together."""
        return self._part.steps

    @property
    def clipped_fraction(self) -> float:
        """Fraction of all optimizer steps so far that were clipped (one host copy)."""
        return self._part.clipped_fraction

    def layout_charts(self) -> dict[str, list[str]]:
        return clipping_charts()

    def engine_part(self) -> ClippingPart:
        return self._part

    def run_config(self) -> dict[str, Any]:
        return {"clipping": {"algorithm": type(self.algorithm).__name__, "repr": repr(self.algorithm)}}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val and not self._warned_double_clipping:
            self._warned_double_clipping = True
            warn_rank_zero(
                f"grad_guard: GradientClipping({self.algorithm!r}) and "
                f"Trainer(gradient_clip_val={clip_val}) both clip: Lightning clips again after "
                "this callback. Remove `gradient_clip_val` (or use NormClip here).",
            )

    def state_dict(self) -> dict[str, Any]:
        return {**self._part.state_dict(), "algorithm": repr(self._part.template)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("algorithm")
        if saved is not None and saved != repr(self._part.template):
            same_class = saved.split("(", 1)[0] == type(self.algorithm).__name__
            states = state_dict.get("algorithms", {}) if same_class else {}
            kept = {}
            for key, state in states.items():
                probe = copy.deepcopy(self._part.template)
                try:
                    probe.load_state_dict(state)
                    kept[key] = state
                except (ValueError, KeyError, RuntimeError):
                    pass
            warn_rank_zero(
                f"grad_guard: the checkpoint's clipping was {saved}, now it is "
                f"{self._part.template!r}; "
                + ("its statistics are kept." if kept else "its statistics start afresh.")
            )
            self._part.load_state_dict({"algorithms": kept})
            return
        self._part.load_state_dict(state_dict)


class AdaptiveGradientClipping(GradientClipping):
    """Deprecated alias of :class:`GradientClipping` (removed in the next release).

    "Adaptive gradient clipping" names AGC in the literature, and ``AGC`` is a class here.
    """

    def __init__(
        self,
        algorithm: ClipAlgorithm | ClipShortcut = "zscore",
        log_every_n_steps: int | None = None,
    ) -> None:
        warnings.warn(
            "grad_guard: `AdaptiveGradientClipping` is now `GradientClipping`; the old name "
            "is removed in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(algorithm, log_every_n_steps)


__all__ = ["AdaptiveGradientClipping", "GradientClipping"]
