"""``GradientNormMonitor``: per-layer gradient norms in TensorBoard at the cost of one read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from grad_guard._validation import check_bool, check_int
from grad_guard.callbacks import shared_pass
from grad_guard.callbacks.base import GradGuardCallback, is_logging_step
from grad_guard.core.layers import Granularity, compile_patterns
from grad_guard.core.stats import NormType
from grad_guard.history import GradientHistory
from grad_guard.loggers import (
    GRAD_HIST,
    UPDATE_RATIO,
    layer_metrics,
    log_scalars,
    monitor_charts,
    tag,
    tensorboard_writers,
    warn_rank_zero,
    write_histograms,
    write_layout,
)


class GradientNormMonitor(GradGuardCallback):
    r"""Log per-layer gradient norms, parameter norms and update/weight ratios.

    Hooks ``on_before_optimizer_step``, where Lightning has accumulated the gradients of
    all micro-batches and unscaled them under ``16-mixed``, so each record is one
    optimizer step's true gradient. Between logging steps the callback does nothing;
    on a logging step it reads the gradients once (one ``torch._foreach_norm`` pass) and
    copies one small packed tensor to the host.

    Logged tags (``<layer>`` is the module path; with several optimizers the tags get an
    ``optimizer_<i>/`` level after the prefix):

    - ``grad_norm/<layer>``: p-norm of the layer's gradient.
    - ``param_norm/<layer>``: norm of the layer's parameters.
    - ``grad_to_param/<layer>``: ``grad_norm / param_norm``.
    - ``update_ratio/<layer>``: ``||theta_after - theta_before|| / ||theta_before||``,
      the size of the optimizer's step relative to the weights (healthy: about 1e-3).
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
        super().__init__(granularity=granularity, norm_type=norm_type)
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.include = include
        self.exclude = exclude
        self._include = compile_patterns("include", include)
        self._exclude = compile_patterns("exclude", exclude)
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
        # optimizer id -> (step, label, computer, layer mask, weights before the step)
        self._snapshots: dict[int, tuple[int, str, Any, list[bool], list[list[Tensor]]]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            log_every_n_steps=self.log_every_n_steps,
            norm_type=self.norm_type,
            granularity=self.granularity,
            include=self.include,
            exclude=self.exclude,
            log_param_norms=self.log_param_norms,
            log_update_ratio=self.log_update_ratio,
            histogram_every_n_steps=self.histogram_every_n_steps,
        )

    def layout_charts(self) -> dict[str, list[str]]:
        return monitor_charts(self.log_param_norms, self.log_update_ratio)

    def _wanted(self, name: str) -> bool:
        if self._include and not any(p.search(name) for p in self._include):
            return False
        return not any(p.search(name) for p in self._exclude)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        if not is_logging_step(trainer, self.log_every_n_steps):
            return
        try:
            self._log_step(trainer, pl_module, optimizer)
        except Exception as err:  # monitoring must never kill training
            self._snapshots.pop(id(optimizer), None)
            warn_rank_zero(f"grad_guard: could not log gradient norms this step ({err!r}).")

    def _log_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        context = self.step_context(trainer, pl_module, optimizer)
        stats, computer = context.stats, context.computer
        step = shared_pass.training_step(trainer)
        label = shared_pass.optimizer_label(trainer, optimizer)
        mask = [
            present and self._wanted(name)
            for name, present in zip(stats.layer_names, stats.has_grad)
        ]

        parts = [stats.layer_norms.float(), stats.total_norm.float().reshape(1)]
        if self.log_param_norms or self.log_update_ratio:
            parts.append(computer.parameter_norms().float())
        values = torch.cat([p.to(stats.layer_norms.device) for p in parts]).cpu().tolist()

        num_layers = len(stats.layer_names)
        metrics = layer_metrics(
            stats.layer_names,
            mask,
            values[:num_layers],
            values[num_layers],
            values[num_layers + 1 :] if self.log_param_norms else None,
            label,
        )
        write_layout(trainer)
        log_scalars(trainer, metrics, step)
        self.logged_steps += 1
        if self.history is not None:
            self._record(step, label, stats, values)
            if self.image_every_n_steps and self.logged_steps % self.image_every_n_steps == 0:
                self._write_images(trainer, step)

        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0:
            self._write_histograms(trainer, stats, mask, label, step)
        if self.log_update_ratio:
            weight_norms = values[num_layers + 1 :]
            self._snapshots[id(optimizer)] = (
                step,
                label,
                computer,
                mask,
                _weights(computer),
                weight_norms,
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if not self._snapshots:
            return
        snapshots, self._snapshots = self._snapshots, {}
        try:
            self._log_update_ratios(trainer, snapshots)
        except Exception as err:  # monitoring must never kill training
            warn_rank_zero(f"grad_guard: could not log update ratios this step ({err!r}).")

    def _log_update_ratios(self, trainer: Any, snapshots: dict[int, Any]) -> None:
        for step, label, computer, mask, before, weight_norms in snapshots.values():
            _subtract_weights_(computer, before)  # `before` now holds -(update)
            update_norms = computer.norms_of(before).float().cpu().tolist()
            metrics = {
                tag(UPDATE_RATIO, name, label): update_norms[i] / max(weight_norms[i], 1e-12)
                for i, name in enumerate(computer.layer_names)
                if mask[i]
            }
            log_scalars(trainer, metrics, step)
            if self.history is not None:
                names = [n for i, n in enumerate(computer.layer_names) if mask[i]]
                ratios = [metrics[tag(UPDATE_RATIO, n, label)] for n in names]
                self.history.record_update_ratios(
                    step, [tag(label, n) if label else n for n in names], ratios
                )

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._snapshots = {}
        if self.image_every_n_steps and self.history is not None and len(self.history):
            self._write_images(trainer, self.history.steps[-1], final=True)

    def _record(self, step: int, label: str, stats: Any, values: list[float]) -> None:
        """Keep this logging step's host values in :attr:`history` (no device access)."""
        num_layers = len(stats.layer_names)
        wanted = [i for i, name in enumerate(stats.layer_names) if self._wanted(name)]
        params = values[num_layers + 1 :] if self.log_param_norms else None
        self.history.record(
            step,
            [tag(label, stats.layer_names[i]) if label else stats.layer_names[i] for i in wanted],
            [values[i] for i in wanted],
            total_norm=values[num_layers],
            param_norms=[params[i] for i in wanted] if params is not None else None,
            has_grad=[stats.has_grad[i] for i in wanted],
        )

    def _write_images(self, trainer: Any, step: int, final: bool = False) -> None:
        from grad_guard import plots

        if final and self._last_image_step == step:
            return
        try:
            if plots.add_images(tensorboard_writers(trainer), self.history, step):
                self._last_image_step = step
        except Exception as err:  # pictures must never stop training
            warn_rank_zero(f"grad_guard: could not draw the gradient images: {err!r}")

    def _write_histograms(
        self, trainer: Any, stats: Any, mask: Sequence[bool], label: str, step: int
    ) -> None:
        chosen = [i for i, keep in enumerate(mask) if keep]
        if len(chosen) > self.max_histogram_layers:
            stride = len(chosen) / self.max_histogram_layers
            chosen = [chosen[int(k * stride)] for k in range(self.max_histogram_layers)]
        write_histograms(
            trainer,
            ((tag(GRAD_HIST, stats.layer_names[i], label), stats.layer_grads[i]) for i in chosen),
            self.histogram_bins,
            step,
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


def _subtract_weights_(computer: Any, before: list[list[Tensor]]) -> None:
    """``before -= weights now``, in place in the snapshot: no second copy of the model."""
    now = [p.detach() for layer in computer.layers for p in layer.params]
    torch._foreach_sub_([t for layer in before for t in layer], now)


def _weights(computer: Any) -> list[list[Tensor]]:
    """Copies of each layer's parameters (``DTensor`` stays sharded), for the update ratio."""
    return [[p.detach().clone() for p in layer.params] for layer in computer.layers]
