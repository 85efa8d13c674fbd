"""What the demo trains: :class:`Experiment`, one configuration.

This module only describes runs; it imports neither torch nor Lightning, so
``grad-guard demo --help`` can list the rows at once. The demo's rows are in
:mod:`grad_guard.demo.experiments`; :mod:`grad_guard.demo.runner` trains them.

Example:
    >>> Experiment("relu-he", expected="vanishing").expected
    'vanishes'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from grad_guard._validation import check_choice, check_float, check_int

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

MODELS: tuple[str, ...] = ("mlp", "residual_mlp", "resnet")
"""Model names an :class:`Experiment` accepts: :class:`~grad_guard.models.DeepMLP`,
:class:`~grad_guard.models.ResidualMLP`, :class:`~grad_guard.models.ResNet`."""

CLIP_ALGORITHMS: tuple[str, ...] = ("norm", "value", "zscore", "autoclip", "agc")
"""Clipping algorithm names (the string shortcuts of grad_guard's clippers)."""

TRAINER_CLIP_ALGORITHMS: dict[str, str] = {"norm": "max_norm", "value": "clip_value"}
"""Algorithms the runner can apply with Lightning's own clipping, and the
``clip_kwargs`` key that holds their threshold."""

OUTCOMES: tuple[str, ...] = ("vanishes", "learns", "diverges", "rescued", "stalls")
"""What a run can show: the first layers get no gradient and nothing is learned
(``vanishes``); it learns; the loss becomes NaN/Inf or blows up (``diverges``); a clipped
run learns (``rescued``); none of these (``stalls``)."""

EXPECTATIONS: tuple[str, ...] = OUTCOMES
_LEGACY_EXPECTATIONS = {"healthy": "learns", "vanishing": "vanishes", "exploding": "diverges"}
DATASETS: tuple[str, ...] = ("digits", "synthetic")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
        steps: optimizer steps to train for (the runner may override it).
        batch_size: samples per step.
        clip_algorithm: ``None`` or one of ``"norm"``, ``"value"``, ``"zscore"``,
            ``"autoclip"``, ``"agc"``.
        clip_kwargs: the algorithm's arguments, named as in grad_guard's clippers
            (``{"max_norm": 1.0}`` for ``"norm"``, ``{"percentile": 10.0}`` for
            ``"autoclip"``, ...).
        lesson: one or two sentences on what the run teaches, for the demo's output.
        expected: the outcome it should show, one of :data:`OUTCOMES` (the old names
            ``"healthy"``, ``"vanishing"``, ``"exploding"`` are read as ``"learns"``,
            ``"vanishes"``, ``"diverges"``).
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
    expected: str = "learns"
    dataset: str = "digits"
    flatten: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                "`name` must be a non-empty string of letters, digits, '.', '_' or '-' "
                f"(it names the TensorBoard run directory), got {self.name!r}"
            )
        if not callable(self.model):
            check_choice("model", self.model, MODELS)
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"`model_kwargs` must be a dict, got {self.model_kwargs!r}")
        check_float("lr", self.lr)
        check_float("momentum", self.momentum, 0.0, 1.0, inclusive_min=True, inclusive_max=False)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        if self.clip_algorithm is not None:
            check_choice("clip_algorithm", self.clip_algorithm, CLIP_ALGORITHMS)
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
        if isinstance(self.expected, str):
            self.expected = _LEGACY_EXPECTATIONS.get(self.expected, self.expected)
        check_choice("expected", self.expected, OUTCOMES)
        check_choice("dataset", self.dataset, DATASETS)
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
        from grad_guard.models import DeepMLP, ResidualMLP, ResNet

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
            'mlp(depth=3) sgd lr=0.1 momentum=0.9 batch=64 clip=value(clip_value=0.5)'
        """
        model = (
            self.model if isinstance(self.model, str) else getattr(self.model, "__name__", "custom")
        )
        args = ", ".join(f"{k}={v}" for k, v in self.model_kwargs.items())
        text = f"{model}({args}) {self.optimizer} lr={self.lr}"
        if self.optimizer == "sgd":
            text += f" momentum={self.momentum}"
        text += f" batch={self.batch_size}"
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
