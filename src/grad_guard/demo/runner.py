"""Train one :class:`~grad_guard.demo.experiment.Experiment` with Lightning and measure it.

:func:`run_experiment` trains it on CPU, logging to TensorBoard, and returns an
:class:`~grad_guard.demo.result.ExperimentResult`: the first/last layer gradient-norm
ratio at step 0, the step at which the loss first became non-finite (divergence is a
result, not a crash), and the final accuracy on the whole dataset.

The runner applies the two fixed clippers Lightning has built in (``"norm"`` and
``"value"``, via ``Trainer(gradient_clip_val=...)``). It never imports grad_guard's
callbacks: the caller passes them (the demo attaches a ``GradGuard`` that clips with
the row's algorithm) and fills :attr:`ExperimentResult.extras` from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import TensorDataset

from grad_guard._validation import check_choice, check_int
from grad_guard.demo.data import digits_dataset, make_loader, synthetic_dataset
from grad_guard.demo.experiment import DATASETS, TRAINER_CLIP_ALGORITHMS, Experiment
from grad_guard.demo.probe import evaluate, probe_gradients
from grad_guard.demo.result import ExperimentResult
from grad_guard.demo.tracking import RunTracker, quiet_lightning
from grad_guard.models import ImageClassifier


def load_dataset(name: str = "digits", flatten: bool = True, seed: int = 0) -> TensorDataset:
    """The dataset an :class:`Experiment` trains on (``"digits"`` or ``"synthetic"``).

    Raises:
        ValueError: if ``name`` is not one of them.

    Example:
        >>> len(load_dataset("synthetic", seed=1))
        1797
    """
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        return digits_dataset(flatten=flatten)
    return synthetic_dataset(seed=seed, flatten=flatten)


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
    version: str | None = None,
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
        out_dir: TensorBoard root; the run goes to ``out_dir/<exp.name>/version_<n>``
            (``out_dir/<exp.name>/<version>`` when ``version`` is given).
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
        version: the run folder's name under ``out_dir/<exp.name>`` (``None``: the next
            free ``version_<n>``).

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

    with quiet_lightning(quiet):
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

        logger = TensorBoardLogger(
            str(out_dir), name=exp.name, version=version, default_hp_metric=False
        )
        logger.log_hyperparams(
            {k: str(v) if isinstance(v, dict) else v for k, v in exp.to_dict().items()}
        )
        tracker = RunTracker(stop_after_nonfinite)
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
