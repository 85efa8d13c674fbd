"""``GradientNormMonitor``: per-layer gradient norms in TensorBoard at the cost of one read."""

from __future__ import annotations

import math
from typing import Any

from grad_guard._validation import check_bool, check_int
from grad_guard.callbacks.base import GradGuardCallback
from grad_guard.core.engine import StepOutcome
from grad_guard.core.layers import Granularity, validate_granularity
from grad_guard.core.metrics import GRAD_HIST, UPDATE_RATIO, tag
from grad_guard.core.parts import MonitorPart
from grad_guard.core.stats import NormType, validate_norm_type
from grad_guard.history import GradientHistory
from grad_guard.loggers import (
    monitor_charts,
    tensorboard_writers,
    warn_rank_zero,
    write_histograms,
)


class GradientNormMonitor(GradGuardCallback):
    r"""Log per-layer gradient norms, parameter norms and update/weight ratios.

    Hooks ``on_before_optimizer_step``, where Lightning has accumulated the gradients of
    all micro-batches and unscaled them under ``16-mixed``, so each record is one
    optimizer step's true gradient. It is one part of grad_guard's step engine: used
    with ``GradientAnomalyDetection`` or ``GradientClipping`` (or inside ``GradGuard``),
    the gradients are read once per step for all of them. On a logging step everything
    reported is copied to the host in one packed tensor.

    Logged tags (``<layer>`` is the module path; with several optimizers the tags get an
    ``optimizer_<i>/`` level after the prefix):

    - ``grad_norm/<layer>``: p-norm of the layer's gradient.
    - ``grad_norm_log10/<layer>``: the same on a log10 scale (layers 1e-16 apart stay
      visible in one chart; ``-inf`` for an exactly zero gradient).
    - ``param_norm/<layer>``: norm of the layer's parameters.
    - ``grad_to_param/<layer>``: ``grad_norm / param_norm``.
    - ``update_ratio/<layer>``: ``||theta_after - theta_before|| / ||theta_before||``,
      the size of the optimizer's step relative to the weights (healthy: about 1e-3),
      measured after the step and written with the next logging step's copy.
    - ``grad_guard/total_grad_norm``: the p-norm over all layers (what
      ``clip_grad_norm_`` would see, before any clipping).
    - ``grad_hist/<layer>``: histogram of gradient values (only when
      ``histogram_every_n_steps`` is set).

    Args:
        log_every_n_steps: log every N optimizer steps (step 0 included); ``None`` uses the
            Trainer's ``log_every_n_steps``.
        norm_type: p of the p-norm: ``2.0`` (default), ``1.0``, ``float("inf")`` or ``"inf"``.
        granularity: ``"module"`` (default: one layer per module that owns parameters),
            ``"parameter"`` (one per tensor) or an int N (module path cut to N parts).
        include: regex or list of regexes; log only layers whose name matches one.
        exclude: regex or list of regexes; do not log layers whose name matches one.
        log_param_norms: also log ``param_norm`` and ``grad_to_param``.
        log_update_ratio: also log ``update_ratio`` (snapshots the weights before the
            step, on logging steps only).
        histogram_every_n_steps: write gradient histograms every N steps; ``None``
            (default) writes none. Histograms are binned on the device.
        max_histogram_layers: at most this many layers get a histogram (evenly spread
            over the model), so a 1000-layer model does not write 1000 per log.
        histogram_bins: number of histogram buckets.
        image_every_n_steps: every N logging steps (and at the end of fit) write a layer x
            step heatmap and a gradient-flow chart to TensorBoard (needs matplotlib:
            ``pip install "grad-guard[plot]"``); ``None`` writes none.
        history_size: logged steps kept in :attr:`history` (evenly thinned beyond that),
            which the pictures and the end-of-fit report are drawn from.

    Attributes:
        history: the :class:`~grad_guard.history.GradientHistory` of the logged host
            values (set it to ``None`` to keep nothing).

    Raises:
        ValueError: if an argument is out of range; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from grad_guard import GradientNormMonitor

        trainer = Trainer(callbacks=[GradientNormMonitor(log_every_n_steps=25)])

    >>> GradientNormMonitor(log_every_n_steps=0)
    Traceback (most recent call last):
    ...
    ValueError: `log_every_n_steps` must be an int >= 1 or None, got 0
    """

    role = "monitor"

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        norm_type: NormType = 2.0,
        granularity: Granularity = "module",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        log_param_norms: bool = True,
        log_update_ratio: bool = True,
        histogram_every_n_steps: int | None = None,
        max_histogram_layers: int = 20,
        histogram_bins: int = 30,
        image_every_n_steps: int | None = 10,
        history_size: int = 512,
    ) -> None:
        super().__init__(log_every_n_steps)
        self.granularity = validate_granularity(granularity)
        self.norm_type = validate_norm_type(norm_type)
        self.include = include
        self.exclude = exclude
        self.log_param_norms = check_bool("log_param_norms", log_param_norms)
        self.log_update_ratio = check_bool("log_update_ratio", log_update_ratio)
        self.histogram_every_n_steps = check_int(
            "histogram_every_n_steps", histogram_every_n_steps, allow_none=True
        )
        self.max_histogram_layers = check_int("max_histogram_layers", max_histogram_layers)
        self.histogram_bins = check_int("histogram_bins", histogram_bins, minimum=2)
        self.image_every_n_steps = check_int(
            "image_every_n_steps", image_every_n_steps, allow_none=True
        )
        self.history_size = check_int("history_size", history_size, minimum=2)
        self.history: GradientHistory | None = GradientHistory(max_steps=history_size)
        self.logged_steps = 0
        self._last_image_step: int | None = None
        self._part = MonitorPart(
            self.granularity,
            self.norm_type,
            include,
            exclude,
            self.log_param_norms,
            self.log_update_ratio,
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key()

    def layout_charts(self) -> dict[str, list[str]]:
        return monitor_charts(self.log_param_norms, self.log_update_ratio)

    def engine_part(self) -> MonitorPart:
        return self._part

    def run_config(self) -> dict[str, Any]:
        return {"monitor": True}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        interval = self.interval(trainer)
        every = self.histogram_every_n_steps
        if every is not None and every % interval:
            warn_rank_zero(
                f"grad_guard: GradientNormMonitor(histogram_every_n_steps={every}) can only "
                f"take effect on logging steps (every {interval} steps), so histograms are "
                f"written every {math.lcm(every, interval)} steps. Use a "
                f"multiple of {interval}."
            )

    def after_outcome(self, trainer: Any, outcome: StepOutcome) -> None:
        for log_step, metrics in outcome.metrics:
            self._record_update_ratios(log_step, metrics)
        logged = outcome.logged
        if logged is None or not self.is_logging_step(trainer, logged["step"]):
            return
        self.logged_steps += 1
        step, label = logged["step"], logged["label"]
        if self.history is not None:
            names = logged["names"]
            chosen = [i for i, name in enumerate(names) if self._part.wanted(name)]
            params = logged["params"] if self.log_param_norms else None
            self.history.record(
                step,
                [tag(label, names[i]) if label else names[i] for i in chosen],
                [logged["norms"][i] for i in chosen],
                total_norm=logged["total"],
                param_norms=[params[i] for i in chosen] if params is not None else None,
                has_grad=[logged["has_grad"][i] for i in chosen],
            )
            if self.image_every_n_steps and self.logged_steps % self.image_every_n_steps == 0:
                self._write_images(trainer, step)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._write_histograms(trainer, outcome, logged)

    def _record_update_ratios(self, step: int, metrics: dict[str, float]) -> None:
        if self.history is None:
            return
        prefix = f"{UPDATE_RATIO}/"
        names = [name[len(prefix) :] for name in metrics if name.startswith(prefix)]
        if names:
            self.history.record_update_ratios(step, names, [metrics[prefix + n] for n in names])

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self.image_every_n_steps and self.history is not None and len(self.history):
            self._write_images(trainer, self.history.steps[-1], final=True)

    def _write_images(self, trainer: Any, step: int, final: bool = False) -> None:
        from grad_guard import plots

        if final and self._last_image_step == step:
            return
        try:
            if plots.add_images(tensorboard_writers(trainer), self.history, step):
                self._last_image_step = step
        except Exception as err:  # pictures must never stop training
            warn_rank_zero(f"grad_guard: could not draw the gradient images: {err!r}")

    def _write_histograms(self, trainer: Any, outcome: StepOutcome, logged: dict[str, Any]) -> None:
        stats = outcome.stats
        if stats is None:
            return
        chosen = [i for i, keep in enumerate(logged["wanted"]) if keep]
        if len(chosen) > self.max_histogram_layers:
            stride = len(chosen) / self.max_histogram_layers
            chosen = [chosen[int(k * stride)] for k in range(self.max_histogram_layers)]
        label = logged["label"]
        write_histograms(
            trainer,
            ((tag(GRAD_HIST, stats.layer_names[i], label), stats.layer_grads[i]) for i in chosen),
            self.histogram_bins,
            logged["step"],
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"logged_steps": self.logged_steps}
        if self.history is not None:
            state["history"] = self.history.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged_steps = int(state_dict.get("logged_steps", 0))
        if self.history is not None and "history" in state_dict:
            self.history.load_state_dict(state_dict["history"])
