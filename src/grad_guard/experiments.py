"""Reproducible gradient experiments on the digits data: the engine of ``grad-guard demo``.

An :class:`Experiment` names a model configuration, an optimizer and an optional
clipping algorithm, plus the lesson it teaches. :func:`run_experiment` trains it with a
Lightning ``Trainer`` on CPU, logging to TensorBoard, and returns an
:class:`ExperimentResult`: the first/last layer gradient-norm ratio at step 0, the step
at which the loss first became non-finite (divergence is a result, not a crash), and the
final accuracy on the whole digits set. :func:`default_experiments` is the demo's matrix:

=============================  ================================================
experiment                     what it shows
=============================  ================================================
``sigmoid-default``            vanishing gradients: ratio ~1e-16, no learning
``tanh-xavier``                Xavier keeps tanh gradients alive; it learns
``relu-he``                    depth 20, lr 0.1, momentum 0.9: unstable, fails
``relu-he-d12``                depth 12 trains, then explodes to NaN late
``relu-he-d12-clip-norm``      global norm clipping at 1.0 fixes it
``residual-bn``                residual blocks + BatchNorm train at depth 20
``relu-he-d12-zclip``          adaptive clipping slot: ZClip (z-score)
``relu-he-d12-autoclip``       adaptive clipping slot: AutoClip (percentile)
=============================  ================================================

The runner applies the two fixed clippers Lightning has built in (``"norm"`` and
``"value"``, via ``Trainer(gradient_clip_val=...)``). It never imports grad_guard's
callbacks: the caller passes them (for example an ``AdaptiveGradientClipping`` built
from :attr:`Experiment.clip_algorithm` and :attr:`Experiment.clip_kwargs` for the
adaptive slots) and fills :attr:`ExperimentResult.extras` from them.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from grad_guard._validation import check_float, check_int
from grad_guard.core.layers import group_parameters
from grad_guard.core.stats import GradientStatsComputer, compute_gradient_stats
from grad_guard.data import digits_dataset, make_loader, synthetic_dataset
from grad_guard.models import DeepMLP, ImageClassifier, ResidualMLP, ResNet, weight_layer_names
from grad_guard.models.init import validate_choice

MODELS: tuple[str, ...] = ("mlp", "residual_mlp", "resnet")
"""Model names an :class:`Experiment` accepts: :class:`~grad_guard.models.DeepMLP`,
:class:`~grad_guard.models.ResidualMLP`, :class:`~grad_guard.models.ResNet`."""

CLIP_ALGORITHMS: tuple[str, ...] = ("norm", "value", "zscore", "autoclip", "agc")
"""Clipping algorithm names (the string shortcuts of ``AdaptiveGradientClipping``)."""

TRAINER_CLIP_ALGORITHMS: dict[str, str] = {"norm": "max_norm", "value": "clip_value"}
"""Algorithms :func:`run_experiment` can apply with Lightning's own clipping, and the
``clip_kwargs`` key that holds their threshold."""

EXPECTATIONS: tuple[str, ...] = ("healthy", "vanishing", "exploding")
DATASETS: tuple[str, ...] = ("digits", "synthetic")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Lightning's advice for real workloads; irrelevant for an in-memory toy dataset
_NOISY_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
    ".*Starting from v1\\.9\\.0, `tensorboardX` has been removed.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # Lightning 2.6 on torch 2.13
)
_NOISY_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.fabric.utilities.seed",
)


@dataclass
class Experiment:
    """One training configuration of the gradient demo.

    Attributes:
        name: short identifier, also the TensorBoard run directory (letters, digits,
            ``.``, ``_``, ``-``).
        model: ``"mlp"``, ``"residual_mlp"``, ``"resnet"``, or a callable
            ``(in_features, num_classes) -> nn.Module`` for your own model.
        model_kwargs: keyword arguments of the model class (``depth``, ``activation``,
            ``init``, ...).
        lr: learning rate.
        momentum: SGD momentum.
        optimizer: ``"sgd"`` or ``"adam"``.
        steps: optimizer steps to train for (:func:`run_experiment` may override it).
        batch_size: samples per step.
        clip_algorithm: ``None`` or one of ``"norm"``, ``"value"``, ``"zscore"``,
            ``"autoclip"``, ``"agc"``.
        clip_kwargs: the algorithm's arguments, named as in grad_guard's clippers
            (``{"max_norm": 1.0}`` for ``"norm"``, ``{"clip_value": 0.5}`` for
            ``"value"``, ``{"percentile": 10.0}`` for ``"autoclip"``, ...).
        lesson: one or two sentences on what the run teaches, for the demo's output.
        expected: the phenomenon it should show: ``"vanishing"``, ``"exploding"`` or
            ``"healthy"``.
        dataset: ``"digits"`` (scikit-learn's, offline) or ``"synthetic"`` (no sklearn).
        flatten: feed ``(N, 64)`` vectors (``True``) or ``(N, 1, 8, 8)`` images
            (``False``); ``None`` picks images for ``"resnet"`` and vectors otherwise.

    Raises:
        ValueError: if a field is out of range or not one of the allowed names.

    Example:
        >>> exp = Experiment("relu-he", model_kwargs={"depth": 4, "activation": "relu"})
        >>> exp.build_model(in_features=64, num_classes=10).depth
        4
        >>> Experiment("bad", clip_algorithm="norm")
        Traceback (most recent call last):
        ...
        ValueError: `clip_kwargs` must hold 'max_norm' (a number > 0) for clip_algorithm='norm', got {}
    """

    name: str
    model: str | Callable[[int, int], nn.Module] = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 0.1
    momentum: float = 0.9
    optimizer: str = "sgd"
    steps: int = 200
    batch_size: int = 64
    clip_algorithm: str | None = None
    clip_kwargs: dict[str, Any] = field(default_factory=dict)
    lesson: str = ""
    expected: str = "healthy"
    dataset: str = "digits"
    flatten: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "`name` must be a non-empty string of letters, digits, '.', '_' or '-' "
                f"(it names the TensorBoard run directory), got {self.name!r}"
            )
        if not callable(self.model):
            validate_choice("model", self.model, MODELS)
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"`model_kwargs` must be a dict, got {self.model_kwargs!r}")
        check_float("lr", self.lr)
        check_float("momentum", self.momentum, 0.0, 1.0, inclusive_min=True, inclusive_max=False)
        validate_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        if self.clip_algorithm is not None:
            validate_choice("clip_algorithm", self.clip_algorithm, CLIP_ALGORITHMS)
        if not isinstance(self.clip_kwargs, dict):
            raise ValueError(f"`clip_kwargs` must be a dict, got {self.clip_kwargs!r}")
        key = TRAINER_CLIP_ALGORITHMS.get(self.clip_algorithm or "")
        if key is not None:
            value = self.clip_kwargs.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"`clip_kwargs` must hold {key!r} (a number > 0) for "
                    f"clip_algorithm={self.clip_algorithm!r}, got {self.clip_kwargs!r}"
                )
        validate_choice("expected", self.expected, EXPECTATIONS)
        validate_choice("dataset", self.dataset, DATASETS)
        if self.flatten is not None and not isinstance(self.flatten, bool):
            raise ValueError(f"`flatten` must be a bool or None, got {self.flatten!r}")

    @property
    def flat_inputs(self) -> bool:
        """Whether the model gets ``(N, 64)`` vectors rather than ``(N, 1, 8, 8)`` images."""
        if self.flatten is not None:
            return self.flatten
        return self.model != "resnet"

    def build_model(self, in_features: int, num_classes: int) -> nn.Module:
        """Instantiate the model (seed the RNG first for reproducible weights).

        Args:
            in_features: features of one flattened input (channels for ``"resnet"`` are
                taken as ``in_features // 64``, i.e. 8x8 images).
            num_classes: number of classes.
        """
        if callable(self.model):
            return self.model(in_features, num_classes)
        if self.model == "mlp":
            return DeepMLP(in_features, num_classes, **self.model_kwargs)
        if self.model == "residual_mlp":
            return ResidualMLP(in_features, num_classes, **self.model_kwargs)
        kwargs = {"in_channels": max(1, in_features // 64), **self.model_kwargs}
        return ResNet(num_classes=num_classes, **kwargs)

    def describe(self) -> str:
        """A one-line summary of the configuration.

        Example:
            >>> Experiment("x", model_kwargs={"depth": 3}, clip_algorithm="value",
            ...            clip_kwargs={"clip_value": 0.5}).describe()
            'mlp(depth=3) sgd lr=0.1 momentum=0.9 clip=value(clip_value=0.5)'
        """
        model = (
            self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "custom")
        )
        args = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        text = f"{model}({args}) {self.optimizer} lr={self.lr}"
        if self.optimizer == "sgd":
            text += f" momentum={self.momentum}"
        if self.clip_algorithm is not None:
            clip_args = ", ".join(f"{k}={v}" for k, v in self.clip_kwargs.items())
            text += f" clip={self.clip_algorithm}({clip_args})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain Python values (a callable ``model`` becomes its name)."""
        data = asdict(self)
        if callable(self.model):
            data["model"] = getattr(self.model, "__name__", "custom")
        return data


@dataclass
class GradientProbe:
    """Per-layer gradient norms of one forward/backward pass.

    Attributes:
        layer_norms: gradient norm of each layer (grad_guard's layer grouping).
        first_layer: the weight layer (``Linear``/``Conv``) nearest the input.
        last_layer: the weight layer nearest the loss.
        ratio: ``norm(first_layer) / norm(last_layer)``; ``<< 1`` means vanishing,
            ``>> 1`` exploding towards the input.
        loss: the loss of the pass.
    """

    layer_norms: dict[str, float]
    first_layer: str
    last_layer: str
    ratio: float
    loss: float


def probe_gradients(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> GradientProbe:
    """One forward/backward pass on a copy of ``model``; the gradient norms per layer.

    The model itself is left untouched (gradients, BatchNorm running statistics): the
    pass runs on a deep copy in training mode. Norms come from
    :func:`grad_guard.core.layers.group_parameters` and
    :func:`grad_guard.core.stats.compute_gradient_stats`; the ratio compares the first and
    last ``Linear``/``Conv`` layers (normalization layers are skipped; a model without
    either compares its first and last layers).

    Args:
        model: the model.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, cross-entropy by default.

    Example:
        >>> from grad_guard.models import DeepMLP
        >>> torch.manual_seed(0) and None
        >>> probe = probe_gradients(DeepMLP(64, 10, depth=20), (torch.randn(32, 64),
        ...                         torch.randint(0, 10, (32,))))
        >>> probe.first_layer, probe.last_layer, probe.ratio < 1e-6
        ('fc01', 'head', True)
    """
    probe = copy.deepcopy(model)
    probe.train()
    probe.zero_grad(set_to_none=True)
    inputs, targets = batch
    loss = loss_fn(probe(inputs), targets)
    loss.backward()
    stats = compute_gradient_stats(group_parameters(probe))
    norms = stats.to_dict()
    weight_layers = set(weight_layer_names(probe))
    names = [name for name in norms if name in weight_layers] or list(norms)
    if not names:
        raise ValueError("`model` has no parameter that received a gradient")
    first, last = names[0], names[-1]
    last_norm = norms[last]
    if last_norm > 0:
        ratio = norms[first] / last_norm
    else:
        ratio = math.inf if norms[first] > 0 else math.nan
    return GradientProbe(norms, first, last, ratio, float(loss.detach()))


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


class _RunTracker(Callback):
    """Records every step's loss and total gradient norm; stops a run that stayed NaN.

    It is placed first among the callbacks, so the norm it records in
    ``on_before_optimizer_step`` is the raw one, before any callback or Lightning clips.
    """

    def __init__(self, stop_after_nonfinite: int | None) -> None:
        self.stop_after_nonfinite = stop_after_nonfinite
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.diverged_at: int | None = None
        self.nonfinite_steps = 0
        self._streak = 0
        self._computer: GradientStatsComputer | None = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self._computer is None:
            self._computer = GradientStatsComputer(group_parameters(pl_module))
        self.grad_norms.append(float(self._computer().total_norm))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, Tensor) else math.nan
        step = len(self.losses)
        self.losses.append(value)
        if math.isfinite(value):
            self._streak = 0
            return
        self.nonfinite_steps += 1
        self._streak += 1
        if self.diverged_at is None:
            self.diverged_at = step
        if self.stop_after_nonfinite is not None and self._streak >= self.stop_after_nonfinite:
            trainer.should_stop = True


@contextmanager
def _quiet_lightning(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in _NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def load_dataset(name: str = "digits", flatten: bool = True, seed: int = 0) -> TensorDataset:
    """The dataset an :class:`Experiment` trains on (``"digits"`` or ``"synthetic"``)."""
    validate_choice("dataset", name, DATASETS)
    if name == "digits":
        return digits_dataset(flatten=flatten)
    return synthetic_dataset(seed=seed, flatten=flatten)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` in eval mode on the whole dataset."""
    was_training = model.training
    model.eval()
    try:
        inputs, targets = dataset.tensors
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    finally:
        model.train(was_training)
    return accuracy, loss


def run_experiment(
    exp: Experiment,
    out_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    steps: int | None = None,
    seed: int = 0,
    progress_bar: bool = True,
    stop_after_nonfinite: int | None = 10,
    trainer_clipping: bool = True,
    log_every_n_steps: int = 1,
    quiet: bool = True,
) -> ExperimentResult:
    """Train ``exp`` on CPU with Lightning and measure its gradients.

    Steps: seed everything with ``seed``; build the model and data; measure the step-0
    gradient ratio with :func:`probe_gradients` on the first training batch; train with
    ``Trainer(max_steps=steps, logger=TensorBoardLogger(out_dir, name=exp.name),
    accelerator="cpu", enable_checkpointing=False)``; evaluate on the whole dataset.
    The same ``seed`` gives the same weights, batches and numbers (CPU kernels are
    deterministic; ``Trainer(deterministic=True)`` is not set because it would switch
    torch's global flag for the rest of the process).

    A non-finite loss is recorded, not raised: :attr:`ExperimentResult.diverged_at`
    holds the first such step. Once the loss has been non-finite for
    ``stop_after_nonfinite`` consecutive steps the weights are NaN and nothing more can
    be learned, so the run stops early (``steps_run`` tells).

    Args:
        exp: the experiment.
        out_dir: TensorBoard root; the run goes to ``out_dir/<exp.name>/version_<n>``.
        callbacks: Lightning callbacks to attach (grad_guard's or any other). Use fresh
            instances for every run.
        steps: optimizer steps; ``None`` uses ``exp.steps``.
        seed: seed for weights, shuffling and dropout.
        progress_bar: show Lightning's progress bar.
        stop_after_nonfinite: stop after this many consecutive non-finite losses
            (``None`` trains all steps).
        trainer_clipping: apply ``"norm"``/``"value"`` clipping with Lightning's
            ``gradient_clip_val``. Set ``False`` when a callback in ``callbacks`` clips
            instead. Adaptive algorithms are always left to ``callbacks``.
        log_every_n_steps: the Trainer's logging interval.
        quiet: silence Lightning's hardware banner and its small-dataset warnings.

    Returns:
        The :class:`ExperimentResult`.

    Raises:
        ValueError: if ``steps``, ``stop_after_nonfinite`` or ``log_every_n_steps`` is
            not a positive int.

    Example:
        >>> import tempfile
        >>> exp = Experiment("tiny", model_kwargs={"depth": 3, "width": 16,
        ...                  "activation": "relu", "init": "he"}, dataset="synthetic")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result = run_experiment(exp, tmp, steps=3, progress_bar=False)
        >>> result.steps_run, result.diverged_at, 0.1 < result.grad_ratio < 10
        (3, None, True)
    """
    steps = exp.steps if steps is None else steps
    check_int("steps", steps)
    check_int("stop_after_nonfinite", stop_after_nonfinite, allow_none=True)
    check_int("log_every_n_steps", log_every_n_steps)
    out_dir = Path(out_dir)

    with _quiet_lightning(quiet):
        pl.seed_everything(seed, verbose=False)
        dataset = load_dataset(exp.dataset, exp.flat_inputs, seed)
        inputs, targets = dataset.tensors
        num_classes = int(targets.max()) + 1
        model = exp.build_model(inputs[0].numel(), num_classes)

        # BatchNorm cannot train on a last batch of one sample: keep batches full
        loader = make_loader(dataset, exp.batch_size, shuffle=True, seed=seed, drop_last=True)
        first_batch = next(iter(make_loader(dataset, exp.batch_size, True, seed, True)))
        probe = probe_gradients(model, first_batch)

        module = ImageClassifier(
            model,
            lr=exp.lr,
            momentum=exp.momentum,
            optimizer=exp.optimizer,
            num_classes=num_classes,
        )
        clip_val: float | None = None
        clip_algorithm: str | None = None
        clipped_by: str | None = None
        if exp.clip_algorithm is not None:
            key = TRAINER_CLIP_ALGORITHMS.get(exp.clip_algorithm)
            if trainer_clipping and key is not None:
                clip_val, clip_algorithm = float(exp.clip_kwargs[key]), exp.clip_algorithm
                clipped_by = "trainer"
            else:
                clipped_by = "callbacks"

        logger = TensorBoardLogger(str(out_dir), name=exp.name, default_hp_metric=False)
        logger.log_hyperparams(
            {k: str(v) if isinstance(v, dict) else v for k, v in exp.to_dict().items()}
        )
        tracker = _RunTracker(stop_after_nonfinite)
        trainer = pl.Trainer(
            max_steps=steps,
            max_epochs=-1,
            accelerator="cpu",
            devices=1,
            logger=logger,
            callbacks=[tracker, *callbacks],
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            log_every_n_steps=log_every_n_steps,
            gradient_clip_val=clip_val,
            gradient_clip_algorithm=clip_algorithm,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=loader)
        wall_time = time.perf_counter() - start
        accuracy, final_loss = evaluate(model, dataset)
        logger.log_metrics({"final/train_accuracy": accuracy}, step=trainer.global_step)
        logger.finalize("success")

    return ExperimentResult(
        experiment=exp,
        grad_ratio=probe.ratio,
        first_layer=probe.first_layer,
        last_layer=probe.last_layer,
        initial_grad_norms=probe.layer_norms,
        diverged_at=tracker.diverged_at,
        nonfinite_steps=tracker.nonfinite_steps,
        train_accuracy=accuracy,
        final_loss=final_loss,
        loss_history=tracker.losses,
        grad_norm_history=tracker.grad_norms,
        steps_run=len(tracker.losses),
        wall_time_s=wall_time,
        log_dir=logger.log_dir,
        clipped_by=clipped_by,
        model=model,
    )


def run_experiments(
    experiments: Sequence[Experiment],
    out_dir: str | Path,
    callbacks_factory: Callable[[Experiment], Sequence[Callback]] | None = None,
    **kwargs: Any,
) -> list[ExperimentResult]:
    """Run several experiments one after the other, with fresh callbacks for each.

    Args:
        experiments: what to run, in order.
        out_dir: TensorBoard root shared by all runs (one sub-directory each).
        callbacks_factory: ``exp -> callbacks`` called before each run.
        **kwargs: passed on to :func:`run_experiment` (``steps``, ``seed``, ...).

    Example:
        >>> import tempfile
        >>> exps = [Experiment("a", model_kwargs={"depth": 2}, dataset="synthetic")]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [r.steps_run for r in run_experiments(exps, tmp, steps=2, progress_bar=False)]
        [2]
    """
    results = []
    for exp in experiments:
        callbacks = list(callbacks_factory(exp)) if callbacks_factory is not None else []
        results.append(run_experiment(exp, out_dir, callbacks, **kwargs))
    return results


def default_experiments(
    depth: int = 20, steps: int = 200, clip_depth: int = 12
) -> list[Experiment]:
    """The demo's matrix: vanishing and exploding gradients, then their fixes.

    Every run uses SGD at lr 0.1 with batches of 64 digits. The two *initialisation*
    runs (sigmoid, tanh) use plain SGD, so that what differs is only how the gradient
    reaches the first layers; the *stability* runs (ReLU, clipping, residual) use
    momentum 0.9, which is what makes a deep plain ReLU stack blow up. Figures measured
    with ``seed=0`` are in the README ("Reference models").

    The adaptive slots (``clip_algorithm="zscore"`` and ``"autoclip"``) only describe the
    algorithm: the caller attaches the clipping callback (see the module docstring).

    Args:
        depth: ``Linear`` layers of the deep runs.
        steps: training steps of every run.
        clip_depth: depth of the run that explodes late and of the clipping runs.

    Raises:
        ValueError: if ``depth`` or ``clip_depth`` is below 2, or ``steps`` below 1.

    Example:
        >>> [exp.name for exp in default_experiments()][:3]
        ['sigmoid-default', 'tanh-xavier', 'relu-he']
        >>> default_experiments()[4].describe()
        'mlp(depth=12, width=64, activation=relu, init=he) sgd lr=0.1 momentum=0.9 clip=norm(max_norm=1.0)'
    """
    check_int("depth", depth, 2)
    check_int("clip_depth", clip_depth, 2)
    check_int("steps", steps)

    def mlp(activation: str, init: str, layers: int) -> dict[str, Any]:
        return {"depth": layers, "width": 64, "activation": activation, "init": init}

    relu_late = mlp("relu", "he", clip_depth)
    late = f"relu-he-d{clip_depth}"
    return [
        Experiment(
            "sigmoid-default",
            "mlp",
            mlp("sigmoid", "default", depth),
            momentum=0.0,
            steps=steps,
            expected="vanishing",
            lesson=(
                "Sigmoid + PyTorch's default init: each layer multiplies the backward signal "
                "by about 0.14 (sigmoid' <= 0.25 times small weights), so the first layer's "
                "gradient is ~1e-16 of the last one's and the network stays at chance."
            ),
        ),
        Experiment(
            "tanh-xavier",
            "mlp",
            mlp("tanh", "xavier", depth),
            momentum=0.0,
            steps=steps,
            lesson=(
                "Same depth, tanh with Xavier init (gain 5/3): the gradient reaches the first "
                "layer at the same order of magnitude as the last one, and the network learns."
            ),
        ),
        Experiment(
            "relu-he",
            "mlp",
            mlp("relu", "he", depth),
            steps=steps,
            expected="exploding",
            lesson=(
                "He init + ReLU fixes the flow at step 0, but a plain 20-layer stack at lr 0.1 "
                "with momentum 0.9 is unstable: gradient spikes throw the weights off and "
                "the network stops learning (or the loss becomes NaN, depending on the seed)."
            ),
        ),
        Experiment(
            late,
            "mlp",
            relu_late,
            steps=steps,
            expected="exploding",
            lesson=(
                "Shallower, the same network trains for a while, then one gradient spike "
                "(norm 1e8 and more) throws it off and the loss becomes NaN."
            ),
        ),
        Experiment(
            f"{late}-clip-norm",
            "mlp",
            relu_late,
            steps=steps,
            clip_algorithm="norm",
            clip_kwargs={"max_norm": 1.0},
            lesson=(
                "Global norm clipping at 1.0 caps every update: the same run trains to "
                "high accuracy."
            ),
        ),
        Experiment(
            "residual-bn",
            "residual_mlp",
            {"depth": depth, "width": 64, "activation": "relu"},
            steps=steps,
            lesson=(
                "Residual connections + BatchNorm at the depth and learning rate that broke "
                "the plain ReLU stack: the identity path carries the gradient, and the "
                "network trains fast and stably."
            ),
        ),
        Experiment(
            f"{late}-zclip",
            "mlp",
            relu_late,
            steps=steps,
            clip_algorithm="zscore",
            clip_kwargs={"alpha": 0.97, "z_threshold": 2.5, "warmup_steps": 25},
            lesson=(
                "ZClip: clip only the gradient norms that are outliers (z-score > 2.5) "
                "against an EMA of recent norms. It keeps the NaN away, but it follows a "
                "norm that keeps rising, so it cuts spikes, not a steady overshoot: it suits "
                "runs that are stable apart from rare spikes, not this one."
            ),
        ),
        Experiment(
            f"{late}-autoclip",
            "mlp",
            relu_late,
            steps=steps,
            clip_algorithm="autoclip",
            clip_kwargs={"percentile": 10.0},
            lesson=(
                "AutoClip: clip at the 10th percentile of the gradient norms seen so far; "
                "the threshold adapts to the run."
            ),
        ),
    ]
