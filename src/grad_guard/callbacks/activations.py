"""``ActivationMonitor``: per-layer activation statistics on logging steps, zero hooks between."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from grad_guard._validation import check_float, check_int
from grad_guard.core.activation_history import ActivationHistory, activation_metrics
from grad_guard.core.activations import ActivationHooks
from grad_guard.core.layers import Granularity, compile_patterns, validate_granularity
from grad_guard.loggers import log_scalars, tensorboard_writers, warn_rank_zero

HEATMAP_TAG = "grad_guard/activation_std_heatmap"


def _training_step(trainer: Any) -> int:
    # the step every grad_guard callback (and Lightning's self.log) logs at
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


class ActivationMonitor(Callback):
    r"""Log per-layer activation statistics: scale, saturated units, dead units, NaN/Inf.

    On a logging step, :meth:`on_train_batch_start` registers forward hooks (see
    :class:`~grad_guard.core.activations.ActivationHooks` for what is measured and how
    activations are attributed to layers) and :meth:`on_train_batch_end` removes them,
    copies one packed tensor to the host and logs. Between logging steps the model has no
    hook at all. With gradient accumulation only the first micro-batch of a logging step
    is measured. Only the training forward is measured (validation runs unhooked).

    Logged tags (``<layer>`` is the module path, as for the gradient monitor):

    - ``activation_mean/<layer>``, ``activation_std/<layer>``: of the layer's output.
    - ``saturated_fraction/<layer>``: outputs of the sigmoid/tanh-family activation after
      the layer that lie within ``1 - saturation_threshold`` of a bound.
    - ``dead_fraction/<layer>``: units of the ReLU-family activation after the layer that
      are 0 for every sample of the batch.
    - ``nonfinite_fraction/<layer>``: NaN/Inf outputs of the layer.
    - ``grad_guard/activation_std_heatmap``: a layer x step image of log10 activation
      std (needs matplotlib), every ``image_every_n_steps`` logging steps and at the end.

    Distributed: statistics are rank-local. Only global rank zero arms hooks and logs,
    so the numbers describe rank zero's micro-batch (no collective is added).

    ``torch.compile``: under dynamo's default ``skip_nnmodule_hook_guards=True``, hooks
    added to an already compiled graph do not run (the first logging step may be
    measured, later ones are not); the callback then warns once. Set
    ``torch._dynamo.config.skip_nnmodule_hook_guards = False`` to measure a compiled
    model (dynamo compiles the hooked variant once more and caches both).

    Args:
        log_every_n_steps: measure every N optimizer steps (step 0 included); ``None``
            uses the Trainer's ``log_every_n_steps``.
        granularity: ``"module"`` (default) or an int N (the module at the path cut to
            N parts is one layer, e.g. ``blocks.3``).
        include: regex or list of regexes; keep only layers whose name matches one.
        exclude: regex or list of regexes; drop layers whose name matches one.
        saturation_threshold: a sigmoid output above ``t`` or below ``1 - t``, a tanh
            output with ``|y| > t``, counts as saturated; in ``(0.5, 1)``.
        image_every_n_steps: write the heatmap every N logging steps (and at the end of
            fit); ``None`` writes none.
        history_size: logged steps kept in :attr:`history` (evenly thinned beyond).

    Attributes:
        history: the :class:`~grad_guard.core.activation_history.ActivationHistory`.
        last: the statistics of the latest logging step, layer -> values.

    Raises:
        ValueError: if an argument is out of range; the message names it.

    Example::

        from lightning.pytorch import Trainer
        from grad_guard.callbacks.activations import ActivationMonitor

        trainer = Trainer(callbacks=[ActivationMonitor(log_every_n_steps=50)])

    >>> ActivationMonitor(saturation_threshold=1.5)
    Traceback (most recent call last):
    ...
    ValueError: `saturation_threshold` must be a number >= 0.5 and < 1, got 1.5
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        granularity: Granularity = "module",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        saturation_threshold: float = 0.99,
        image_every_n_steps: int | None = 10,
        history_size: int = 512,
    ) -> None:
        super().__init__()
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.granularity = validate_granularity(granularity)
        if granularity == "parameter":
            raise ValueError(
                "`granularity` must be 'module' or a positive int depth for activation "
                "statistics (activations belong to modules), got 'parameter'"
            )
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.include, self.exclude = include, exclude
        self.saturation_threshold = check_float(
            "saturation_threshold", saturation_threshold, 0.5, 1.0,
            inclusive_min=True, inclusive_max=False,
        )  # fmt: skip
        self.image_every_n_steps = check_int(
            "image_every_n_steps", image_every_n_steps, allow_none=True
        )
        self.history_size = check_int("history_size", history_size, minimum=2)
        self.history = ActivationHistory(max_steps=history_size)
        self.last: dict[str, Any] = {}
        self.logged_steps = 0
        self._hooks: ActivationHooks | None = None
        self._armed_step: int | None = None
        self._last_image_step: int | None = None
        self._warned_empty = False

    @property
    def state_key(self) -> str:
        # the class name, as for the other callbacks: a resume with changed options
        # keeps the history (layer names that no longer appear are simply not extended)
        return self._generate_state_key()

    @property
    def hook_count(self) -> int:
        """Forward hooks this callback has on the model right now (0 between logging steps)."""
        return 0 if self._hooks is None else self._hooks.hook_count

    def interval(self, trainer: Any) -> int:
        """The logging interval in optimizer steps."""
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        return max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._disarm()
        self._hooks = ActivationHooks(
            pl_module, self.granularity, self.include, self.exclude, self.saturation_threshold
        )
        self._armed_step = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._hooks is None or not getattr(trainer, "is_global_zero", True):
            return
        if self._hooks.armed:  # the last batch never ran (skipped by on_train_batch_start)
            self._hooks.disarm()
            self._hooks.read()
            self._armed_step = None  # measure its step on the next batch instead
        step = _training_step(trainer)
        if step % self.interval(trainer) or step == self._armed_step:
            return  # not a logging step, or a later micro-batch of this one
        self._armed_step = step
        self._hooks.arm()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        if self._hooks is None or not self._hooks.armed:
            return
        self._hooks.disarm()
        try:
            self._log(trainer, self._armed_step or 0)
        except Exception as err:  # monitoring must never kill training
            warn_rank_zero(f"grad_guard: could not log activation statistics ({err!r}).")

    def _log(self, trainer: Any, step: int) -> None:
        stats = self._hooks.read()
        if not stats:
            if not self._warned_empty and self._hooks.layer_names:
                self._warned_empty = True
                warn_rank_zero(
                    "grad_guard: ActivationMonitor's hooks did not run this step. Is the model "
                    "compiled with torch.compile? Set torch._dynamo.config."
                    "skip_nnmodule_hook_guards = False to measure compiled modules."
                )
            return
        self.last = stats
        log_scalars(trainer, activation_metrics(stats), step)
        self.history.record(step, stats)
        self.logged_steps += 1
        if self.image_every_n_steps and self.logged_steps % self.image_every_n_steps == 0:
            self._write_image(trainer, step)

    def _disarm(self) -> None:
        if self._hooks is not None:
            self._hooks.disarm()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._disarm()
        if (
            self.image_every_n_steps
            and len(self.history)
            and self._last_image_step != self.history.steps[-1]
        ):
            self._write_image(trainer, self.history.steps[-1])

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._disarm()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._disarm()

    def _write_image(self, trainer: Any, step: int) -> None:
        from grad_guard import plots

        writers = tensorboard_writers(trainer)
        if not writers or not plots.available():
            return
        try:
            image = plots.figure_to_array(std_heatmap_figure(self.history))
        except Exception as err:  # pictures must never stop training
            warn_rank_zero(f"grad_guard: could not draw the activation heatmap: {err!r}")
            return
        for writer in writers:
            writer.add_image(HEATMAP_TAG, image, global_step=step, dataformats="HWC")
        self._last_image_step = step

    def state_dict(self) -> dict[str, Any]:
        return {"logged_steps": self.logged_steps, "history": self.history.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.logged_steps = int(state_dict.get("logged_steps", 0))
        if "history" in state_dict:
            self.history.load_state_dict(state_dict["history"])


def std_heatmap_figure(history: ActivationHistory) -> Any:
    """Layer x step image of ``log10`` activation std (input at the top; needs matplotlib).

    NaN cells (a layer whose outputs were non-finite, or not measured) are light grey.

    Example:
        >>> from grad_guard.core.activations import LayerActivations
        >>> history = ActivationHistory()
        >>> history.record(0, {"fc1": LayerActivations(0.0, 1.0, 0.0)})
        >>> std_heatmap_figure(history).axes[0].images[0].get_array().shape
        (1, 1)
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from grad_guard import plots

    width, height = plots.heatmap_size(len(history.layers))
    figure = Figure(figsize=(width / plots.DEFAULT_DPI, height / plots.DEFAULT_DPI))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    data = history.matrix("std")
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(data > 0, np.log10(np.where(data > 0, data, 1.0)), np.nan)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = axes.imshow(
        np.ma.masked_invalid(logs), aspect="auto", interpolation="nearest", cmap=cmap
    )
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02).set_label("log10 std")
    rows = len(history.layers)
    ticks = list(range(rows)) if rows <= 40 else [round(i * (rows - 1) / 39) for i in range(40)]
    axes.set_yticks(ticks)
    axes.set_yticklabels([history.layers[i][-28:] for i in ticks], fontsize=7)
    columns = len(history.steps)
    xticks = list(range(columns)) if columns <= 8 else [round(i * (columns - 1) / 7) for i in range(8)]
    axes.set_xticks(xticks)
    axes.set_xticklabels([str(history.steps[i]) for i in xticks], fontsize=8)
    axes.set_xlabel("step")
    axes.set_ylabel("layer (input at top)")
    axes.set_title("log10 activation std per layer", fontsize=10)
    figure.tight_layout()
    return figure
