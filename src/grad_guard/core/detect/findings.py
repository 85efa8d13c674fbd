"""What the rules found, once it reaches the host, and the packed layout it travels in."""

from __future__ import annotations

from dataclasses import dataclass

from grad_guard.core.events import AnomalyEvent


@dataclass(frozen=True)
class KindFindings:
    """What one rule found since the last read (host values).

    Attributes:
        kind: ``"nonfinite"``, ``"exploding"``, ``"vanishing"`` or ``"loss_spike"``.
        count: steps on which it fired.
        first_step: the first of those steps (``None`` if it did not fire).
        now: whether it fired on the latest step (what an immediate action acts on).
        layers: every layer involved since the last read, forward order.
        values: each layer's gradient norm the last time it was involved.
        active: the layers involved on the latest step.
        threshold: the threshold the last time it fired.
        rule: which rule fired the last time.
        total_norm: the total gradient norm when it fired (``"exploding"``).
        loss: the training loss when it fired (``"loss_spike"``).
    """

    kind: str
    count: int
    first_step: int | None
    now: bool
    layers: tuple[str, ...]
    values: tuple[float, ...]
    active: tuple[str, ...]
    threshold: float | None
    rule: str
    total_norm: float | None = None
    loss: float | None = None

    def event(self, action: str) -> AnomalyEvent | None:
        """The :class:`AnomalyEvent` for these findings, or ``None`` if nothing fired."""
        if not self.count:
            return None
        return AnomalyEvent(
            step=self.first_step if self.first_step is not None else -1,
            kind=self.kind,
            layers=self.layers,
            values=self.values,
            threshold=self.threshold,
            action=action,
            rule=self.rule,
            origin=self.layers[-1] if self.kind == "nonfinite" and self.layers else None,
            total_norm=self.total_norm,
            loss=self.loss,
            occurrences=self.count,
        )


@dataclass(frozen=True)
class Findings:
    """Everything :meth:`GradientAnomalyDetector.read` found, per rule.

    Attributes:
        nonfinite, exploding, vanishing, loss_spike: the :class:`KindFindings` of each
            rule.
        amp_overflows: steps the GradScaler will skip because of an overflow.
        amp_now: whether the latest step is one of them.
        updates: steps covered by this read.
    """

    nonfinite: KindFindings
    exploding: KindFindings
    vanishing: KindFindings
    loss_spike: KindFindings
    amp_overflows: int
    amp_now: bool
    updates: int

    def kinds(self) -> tuple[KindFindings, KindFindings, KindFindings, KindFindings]:
        return (self.nonfinite, self.exploding, self.vanishing, self.loss_spike)

    @property
    def any_now(self) -> bool:
        """Whether any rule fired on the latest step."""
        return any(found.now for found in self.kinds())


# Packed layout: per-kind scalar slots, a few single scalars, then three [3, L] blocks
# (involved since the last read, involved now, last value) for the three layer rules.
NUM_KINDS = 4  # nonfinite, exploding, vanishing, loss_spike (order of KINDS)
LAYER_KINDS = 3  # the first three name layers
S_COUNT, S_AGE, S_NOW, S_THRESHOLD = (k * NUM_KINDS for k in range(4))
S_AMP_COUNT, S_AMP_NOW, S_TOTAL, S_SPIKE_RULE, S_RATIO_RULE, S_LOSS, S_LOSS_RULE = range(
    4 * NUM_KINDS, 4 * NUM_KINDS + 7
)
NUM_SCALARS = 4 * NUM_KINDS + 7
NAN_CODE = -1.0  # norms are >= 0; NaN is encoded so the MAX all-reduce stays defined


def packed_size(num_layers: int) -> int:
    """Length of the packed findings tensor for ``num_layers`` layers."""
    return NUM_SCALARS + 3 * LAYER_KINDS * num_layers
