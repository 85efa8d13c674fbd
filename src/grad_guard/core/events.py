"""What a detected gradient anomaly looks like once it reaches the host.

An :class:`AnomalyEvent` is a plain record (step, kind, layers, values, threshold,
action) that the Lightning callback keeps in its ``events`` list, writes to TensorBoard
as text, saves in checkpoints and attaches to :class:`GradientAnomalyError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

AnomalyKind = Literal["nonfinite", "exploding", "vanishing", "loss_spike", "amp_overflow"]
#: the rules, in the order of their packed findings
KINDS: tuple[str, ...] = ("nonfinite", "exploding", "vanishing", "loss_spike")

# What each kind of anomaly may do; "skip" drops the step, "rollback" restores the last
# healthy snapshot; vanishing needs neither (the weights are not damaged).
NonfiniteAction = Literal["skip", "rollback", "warn", "stop", "raise"]
ExplodingAction = Literal["warn", "skip", "rollback", "stop", "raise"]
VanishingAction = Literal["warn", "stop", "raise"]
LossSpikeAction = Literal["warn", "skip", "rollback", "stop", "raise"]
NONFINITE_ACTIONS: tuple[str, ...] = ("skip", "rollback", "warn", "stop", "raise")
EXPLODING_ACTIONS: tuple[str, ...] = ("warn", "skip", "rollback", "stop", "raise")
VANISHING_ACTIONS: tuple[str, ...] = ("warn", "stop", "raise")
LOSS_SPIKE_ACTIONS: tuple[str, ...] = ("warn", "skip", "rollback", "stop", "raise")
#: actions that keep the optimizer from applying the step's gradients
DROPPING_ACTIONS = frozenset({"skip", "rollback"})

_MAX_NAMED_LAYERS = 8  # longer lists are cut in messages (the event keeps them all)

_ADVICE = {
    "nonfinite": "check the loss for log(0)/division by zero, lower the learning rate, or "
    "clip gradients",
    "exploding": "lower the learning rate, clip gradients (e.g. AdaptiveGradientClipping), "
    "or add normalization layers",
    "vanishing": "use ReLU-like activations with He init, BatchNorm/LayerNorm, or residual "
    "connections",
    "loss_spike": "look at the batch that caused it, lower the learning rate or warm it up, "
    "or roll back with on_loss_spike='rollback'",
}


class GradientAnomalyWarning(UserWarning):
    """Category of the warnings grad_guard emits for anomalies (easy to filter)."""


@dataclass(frozen=True)
class AnomalyEvent:
    """One detected anomaly.

    Attributes:
        step: the optimizer step (``trainer.global_step``) it was first seen at.
        kind: ``"nonfinite"``, ``"exploding"``, ``"vanishing"``, ``"loss_spike"`` or
            ``"amp_overflow"``.
        layers: the layers involved, in forward order (first = nearest the input).
        values: the gradient norm of each layer in ``layers`` (``nan``/``inf`` for
            non-finite ones).
        threshold: the limit that was crossed: for ``"exploding"`` the total-norm limit,
            for ``"vanishing"`` the per-layer norm below which a layer counts as vanishing;
            ``None`` for ``"nonfinite"``.
        action: what was done: ``"warn"``, ``"skip"``, ``"rollback"``, ``"stop"`` or
            ``"raise"``.
        rule: which rule fired: ``"nonfinite"``, ``"max_total_norm"``, ``"spike"``,
            ``"min_norm"``, ``"min_ratio"``, ``"nonfinite_loss"`` or ``"loss_spike"``.
        origin: for ``"nonfinite"``, the affected layer closest to the loss (last in
            forward order): where the non-finite values most likely entered the
            backward pass.
        total_norm: the total gradient norm of the step (``"exploding"`` only).
        occurrences: steps merged into this event (more than 1 when flags were read
            lazily, at a logging step, for a whole interval).
        loss: the training loss of the step (``"loss_spike"`` only).
        forward_origin: for ``"nonfinite"``, where the non-finite values were born in
            the forward pass, when it could be found: ``"parameter fc3.weight"`` for a
            non-finite parameter, else the first module (forward order) whose output
            was non-finite.
        restored_step: for ``"rollback"``, the step of the snapshot restored.
    """

    step: int
    kind: str
    layers: tuple[str, ...]
    values: tuple[float, ...]
    threshold: float | None
    action: str
    rule: str = ""
    origin: str | None = None
    total_norm: float | None = None
    occurrences: int = 1
    loss: float | None = None
    forward_origin: str | None = None
    restored_step: int | None = None

    def message(self) -> str:
        """One human-readable sentence naming the layers, values and threshold."""
        names = _layer_list(self.layers, self.values)
        when = f"at step {self.step}"
        if self.occurrences > 1:
            when += f" (and {self.occurrences - 1} more step(s) since the last check)"
        if self.kind == "nonfinite":
            text = f"non-finite (NaN/Inf) gradient {when} in {len(self.layers)} layer(s): {names}"
            if self.origin is not None:
                text += f"; likely origin: {self.origin!r} (affected layer closest to the loss)"
        elif self.kind == "exploding":
            text = (
                f"exploding gradient {when}: total norm {_fmt(self.total_norm)} > "
                f"{_fmt(self.threshold)} ({_RULES.get(self.rule, self.rule)}); "
                f"layers: {names}"
            )
        elif self.kind == "vanishing":
            text = (
                f"vanishing gradient {when} in {len(self.layers)} layer(s): {names}; "
                f"norm below {_fmt(self.threshold)} ({_RULES.get(self.rule, self.rule)})"
            )
        elif self.kind == "loss_spike":
            text = f"loss spike {when}: loss {_fmt(self.loss)}"
            if self.threshold is not None:
                text += f" > {_fmt(self.threshold)} ({_RULES.get(self.rule, self.rule)})"
            else:
                text += f" ({_RULES.get(self.rule, self.rule)})"
        else:
            text = f"{self.kind} {when}"
        if self.forward_origin is not None and self.forward_origin.startswith("parameter "):
            text += f"; parameter `{self.forward_origin[len('parameter '):]}` is non-finite"
        elif self.forward_origin is not None:
            text += f"; born in the forward pass at {self.forward_origin!r}"
        if self.restored_step is not None:
            text += f"; rolled back to the snapshot of step {self.restored_step}"
        return f"grad_guard: {text}. Action: {self.action}."

    def advice(self) -> str:
        """What usually helps for this kind of anomaly."""
        return _ADVICE.get(self.kind, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (for checkpoints and JSON)."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["values"] = list(self.values)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyEvent:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["layers"] = tuple(kwargs.get("layers", ()))
        # math.nan itself, so that restored events compare equal (nan == nan is False,
        # but tuples compare identical objects as equal)
        kwargs["values"] = tuple(
            math.nan if math.isnan(float(v)) else float(v) for v in kwargs.get("values", ())
        )
        return cls(**kwargs)

    def markdown(self) -> str:
        """The event as a small Markdown table (TensorBoard's text plugin renders it)."""
        rows = [
            f"**{self.kind}** at step {self.step} — action `{self.action}`",
            "",
            "| layer | gradient norm |",
            "|---|---|",
        ]
        rows += [f"| `{name}` | {_fmt(value)} |" for name, value in zip(self.layers, self.values)]
        details = []
        if self.threshold is not None:
            details.append(f"threshold {_fmt(self.threshold)} ({self.rule})")
        if self.total_norm is not None:
            details.append(f"total norm {_fmt(self.total_norm)}")
        if self.origin is not None:
            details.append(f"likely origin `{self.origin}`")
        if self.forward_origin is not None:
            details.append(f"born in the forward pass at `{self.forward_origin}`")
        if self.loss is not None:
            details.append(f"loss {_fmt(self.loss)}")
        if self.restored_step is not None:
            details.append(f"restored the snapshot of step {self.restored_step}")
        if self.occurrences > 1:
            details.append(f"{self.occurrences} steps")
        if details:
            rows += ["", "; ".join(details)]
        return "\n".join(rows)


_RULES = {
    "max_total_norm": "absolute limit `max_total_norm`",
    "spike": "z-score spike against recent steps",
    "min_norm": "absolute limit `vanishing_min_norm`",
    "min_ratio": "`vanishing_min_ratio` x the largest layer norm",
    "nonfinite_loss": "the loss is NaN/Inf",
    "loss_spike": "z-score spike of the loss against recent steps",
}


class GradientAnomalyError(RuntimeError):
    """Raised by the ``"raise"`` action; ``error.event`` is the :class:`AnomalyEvent`.

    Example:
        >>> event = AnomalyEvent(3, "nonfinite", ("net.2",), (float("nan"),), None, "raise",
        ...                      rule="nonfinite", origin="net.2")
        >>> error = GradientAnomalyError(event)
        >>> error.event.layers
        ('net.2',)
        >>> "net.2" in str(error)
        True
    """

    def __init__(self, event: AnomalyEvent) -> None:
        super().__init__(f"{event.message()} Try: {event.advice()}.")
        self.event = event

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (ddp_spawn)
        return (type(self), (self.event,))


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3g}"


def _layer_list(layers: tuple[str, ...], values: tuple[float, ...]) -> str:
    shown = [f"{name!r} ({_fmt(value)})" for name, value in zip(layers, values)]
    if len(shown) > _MAX_NAMED_LAYERS:
        hidden = len(shown) - _MAX_NAMED_LAYERS
        shown = [*shown[:_MAX_NAMED_LAYERS], f"... and {hidden} more"]
    return ", ".join(shown) if shown else "(none)"
