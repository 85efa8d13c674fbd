"""``GradGuard``: monitoring, anomaly detection and clipping in one callback, one pass."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from grad_guard._validation import check_bool, check_int, check_optional_path
from grad_guard.callbacks.activations import ActivationMonitor
from grad_guard.callbacks.base import GradGuardCallback, run_config
from grad_guard.callbacks.clipping import GradientClipping
from grad_guard.callbacks.detection import GradientAnomalyDetection
from grad_guard.callbacks.monitor import GradientNormMonitor
from grad_guard.core.clip import ClipAlgorithm, ClipShortcut, resolve_algorithm
from grad_guard.loggers import is_global_zero, warn_rank_zero


class GradGuard(GradGuardCallback):
    r"""Watch, protect and explain a training run's gradients with one callback.

    ``GradGuard`` composes the three stand-alone callbacks and runs them in the order that
    makes each step safe: statistics of the raw (unscaled, unclipped) gradients → anomaly
    detection and its action (a skipped step is not clipped) → clipping → logging. The
    parts share one statistics pass per optimizer step: the gradients are read once. At
    the end of ``fit`` it prints a health report with a diagnosis and writes it as
    ``grad_guard_report.json`` / ``.md`` next to the logs.

    Args:
        monitor: ``True`` for a default :class:`GradientNormMonitor`, a configured one, or
            ``False`` to log nothing per layer.
        detection: ``True`` for a default :class:`GradientAnomalyDetection` (skip non-finite
            steps, warn on exploding/vanishing), a configured one, or ``False``.
        clipping: a clipping algorithm (``ZClip()``, ``AutoClip()``, ``AGC()``,
            ``NormClip(1.0)``...), its string shortcut (``"zscore"``, ``"autoclip"``,
            ``"agc"``, ``"norm"``, ``"value"``), a configured
            :class:`GradientClipping`, or ``None`` not to clip. Default ``"zscore"``:
            ZClip only acts on spikes, after a warm-up, so healthy runs are untouched.
        log_every_n_steps: logging interval for every part that was built from defaults
            (``None``: the Trainer's ``log_every_n_steps``).
        report: print the health report at the end of ``fit`` and write it to the logger's
            directory.
        report_dir: where to write the report files instead (default: the logger's
            ``log_dir``). The heatmap and gradient-flow PNGs go there too when matplotlib
            is installed.
        print_report: print the report to the console (it is written either way).
        activations: ``True`` for a default :class:`~grad_guard.ActivationMonitor`
            (activation statistics on logging steps: the causes behind vanishing and
            exploding gradients), a configured one, or ``False`` (default: it makes a
            second host copy on logging steps and hooks the forward pass of logging
            steps, so it is opt-in).

    Raises:
        ValueError: if a part is of the wrong type; the message names the argument.

    Example::

        from lightning.pytorch import Trainer
        from grad_guard import GradGuard, GradientAnomalyDetection, AutoClip

        trainer = Trainer(callbacks=[GradGuard()])  # sensible defaults
        trainer = Trainer(callbacks=[GradGuard(
            detection=GradientAnomalyDetection(on_nonfinite="raise"),
            clipping=AutoClip(percentile=10.0),
        )])

    >>> guard = GradGuard(clipping=None)
    >>> [type(part).__name__ for part in guard.parts]
    ['GradientAnomalyDetection', 'GradientNormMonitor']
    """

    def __init__(
        self,
        monitor: GradientNormMonitor | bool = True,
        detection: GradientAnomalyDetection | bool = True,
        clipping: GradientClipping | ClipAlgorithm | ClipShortcut | bool | None = "zscore",
        log_every_n_steps: int | None = None,
        report: bool = True,
        report_dir: str | None = None,
        print_report: bool = True,
        activations: ActivationMonitor | bool = False,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        interval = {"log_every_n_steps": log_every_n_steps}
        self.monitor = _part("monitor", monitor, GradientNormMonitor, interval)
        self.detection = _part("detection", detection, GradientAnomalyDetection, interval)
        self.activations = _part("activations", activations, ActivationMonitor, interval)
        if clipping is True:
            clipping = "zscore"
        if clipping is None or clipping is False or isinstance(clipping, GradientClipping):
            self.clipping = clipping or None
        elif isinstance(clipping, (ClipAlgorithm, str)):
            algorithm = resolve_algorithm(clipping, "clipping")
            self.clipping = GradientClipping(algorithm, log_every_n_steps=log_every_n_steps)
        else:
            raise ValueError(
                "`clipping` must be a ClipAlgorithm, one of its string shortcuts, a "
                f"GradientClipping or None, got {clipping!r}"
            )
        report_dir = check_optional_path("report_dir", report_dir)
        super().__init__(log_every_n_steps)
        self.report = check_bool("report", report)
        self.report_dir = report_dir
        self.print_report = check_bool("print_report", print_report)
        self.last_report: Any = None

    @property
    def parts(self) -> list[Any]:
        """The enabled parts, in the order they act within a step."""
        ordered = (self.detection, self.clipping, self.monitor, self.activations)
        return [part for part in ordered if part is not None]

    @property
    def state_key(self) -> str:
        return self._generate_state_key()

    def engine_part(self) -> None:  # its parts register themselves
        return None

    def layout_charts(self) -> dict[str, list[str]]:
        charts: dict[str, list[str]] = {}
        for part in self.parts:
            provider = getattr(part, "layout_charts", None)
            if callable(provider):
                charts.update(provider())
        return charts

    # Each hook forwards to the parts; they share one engine, so one read of the grads.
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for part in self.parts:
            part.setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        for part in self.parts:
            part.on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for part in self.parts:
            part.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        for part in self.parts:
            part.on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Optimizer) -> None:
        for part in self.parts:
            part.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        for part in self.parts:
            part.on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for part in self.parts:
            part.on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for part in self.parts:
            part.on_fit_end(trainer, pl_module)
        if self.report and is_global_zero(trainer):
            try:
                self.last_report = self._write_report(trainer, pl_module)
            except Exception as err:  # a report must never cost the user their run
                warn_rank_zero(f"grad_guard: could not build the health report: {err!r}")

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self._named_parts().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, part in self._named_parts().items():
            if name in state_dict:
                part.load_state_dict(state_dict[name])

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        for part in self.parts:
            part.on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for part in self.parts:
            part.teardown(trainer, pl_module, stage)

    def _named_parts(self) -> dict[str, Any]:
        named = {
            "monitor": self.monitor,
            "detection": self.detection,
            "clipping": self.clipping,
            "activations": self.activations,
        }
        return {name: part for name, part in named.items() if part is not None}

    def _write_report(self, trainer: Any, pl_module: Any) -> Any:
        from grad_guard.report import report_for_trainer

        history = getattr(self.monitor, "history", None)
        if history is None:
            return None
        session = next((p._session for p in self.parts if getattr(p, "_session", None)), None)
        config = run_config(trainer, session) if session is not None else None
        if config is not None:
            config["activations"] = self.activations is not None
        return report_for_trainer(
            trainer,
            pl_module,
            history,
            config=config,
            activations=getattr(self.activations, "history", None),
            print_report=self.print_report,
            directory=self.report_dir,
            counts=self.detection.counts if self.detection else None,
            clipped_fraction=self.clipping.clipped_fraction if self.clipping else None,
            events=self.detection.events if self.detection else None,
        )


def _part(argument: str, value: Any, cls: type, defaults: dict[str, Any]) -> Any:
    if value is True:
        return cls(**defaults)
    if value is False or value is None:
        return None
    if isinstance(value, cls):
        return value
    raise ValueError(f"`{argument}` must be True, False or a {cls.__name__}, got {value!r}")
