"""What to do about what the rules found: actions, counts, events and rate-limited warnings.

:class:`AnomalyPolicy` is the host half of anomaly detection, shared by every front end
(the Lightning callbacks and the plain-loop guard), so both count, record, warn and
decide alike. It never touches tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from grad_guard._validation import check_choice, check_int
from grad_guard.core.detect.config import DetectionConfig
from grad_guard.core.detect.findings import Findings
from grad_guard.core.detect.ratelimit import WarnedLayers
from grad_guard.core.events import (
    DROPPING_ACTIONS,
    EXPLODING_ACTIONS,
    KINDS,
    LOSS_SPIKE_ACTIONS,
    NONFINITE_ACTIONS,
    VANISHING_ACTIONS,
    AnomalyEvent,
)
from grad_guard.core.layers import Granularity, validate_granularity
from grad_guard.core.rollback import Recovery, RollbackConfig
from grad_guard.core.stats import validate_norm_type

COUNTERS = (*KINDS, "amp_overflow", "skipped_steps", "rollbacks")
ACTION_CHOICES = {
    "nonfinite": NONFINITE_ACTIONS,
    "exploding": EXPLODING_ACTIONS,
    "vanishing": VANISHING_ACTIONS,
    "loss_spike": LOSS_SPIKE_ACTIONS,
}


@dataclass
class Decision:
    """What a read of the findings asks the front end to do and say.

    Attributes:
        events: events recorded by this read (new ones only, rate-limited).
        warnings: messages to warn with, after the actions were applied.
        actions: action -> the event that asks for it, for the latest step.
        stop_reason: set when the run must stop (a ``"stop"`` action or too many
            consecutive skips).
    """

    events: list[AnomalyEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    actions: dict[str, AnomalyEvent] = field(default_factory=dict)
    stop_reason: str | None = None

    @property
    def drops(self) -> bool:
        """Whether the latest step is not applied (a ``"skip"`` or a ``"rollback"``)."""
        return "skip" in self.actions or "rollback" in self.actions


class AnomalyPolicy:
    r"""Actions per kind, and the counts, events and warnings they produce.

    Args:
        config: the rules' thresholds.
        on_nonfinite, on_exploding, on_vanishing, on_loss_spike: the action per kind.
        max_consecutive_skips: stop after this many dropped steps in a row.
        max_events: keep at most this many events (the counters keep counting).
        granularity: the layers the rules judge.
        norm_type: p of the judged norms.
        rollback: how ``"rollback"`` snapshots and recovers (default
            :class:`~grad_guard.core.rollback.RollbackConfig()`); used only when an
            action is ``"rollback"``.

    Attributes:
        counts: steps per anomaly kind, plus ``amp_overflow``, ``skipped_steps`` and
            ``rollbacks`` (``skipped_steps`` counts every step whose gradients were not
            applied, rolled-back ones included).
        events: the recorded :class:`AnomalyEvent`\ s, oldest first.

    Raises:
        ValueError: if an action is not allowed for its kind, or a limit is not an int.

    Example:
        >>> policy = AnomalyPolicy(DetectionConfig(), on_vanishing="skip")
        Traceback (most recent call last):
        ...
        ValueError: `on_vanishing` must be one of 'warn', 'stop', 'raise', got 'skip'
    """

    def __init__(
        self,
        config: DetectionConfig,
        on_nonfinite: str = "skip",
        on_exploding: str = "warn",
        on_vanishing: str = "warn",
        on_loss_spike: str = "warn",
        max_consecutive_skips: int = 10,
        max_events: int = 1000,
        granularity: Granularity = "module",
        norm_type: float | str = 2.0,
        rollback: RollbackConfig | None = None,
    ) -> None:
        self.config = config
        self.granularity = validate_granularity(granularity)
        self.norm_type = validate_norm_type(norm_type)
        given = {
            "nonfinite": on_nonfinite,
            "exploding": on_exploding,
            "vanishing": on_vanishing,
            "loss_spike": on_loss_spike,
        }
        self.actions = {
            kind: check_choice(f"on_{kind}", action, ACTION_CHOICES[kind])
            for kind, action in given.items()
        }
        self.max_consecutive_skips = check_int("max_consecutive_skips", max_consecutive_skips)
        self.max_events = check_int("max_events", max_events, minimum=0)
        enabled = {
            "nonfinite": True,
            "exploding": config.detects_exploding,
            "vanishing": config.detects_vanishing,
            "loss_spike": True,
        }
        self.enabled = enabled
        #: kinds whose action drops the step (evaluated on the device, see the engine)
        self.dropping = tuple(
            enabled[kind] and self.actions[kind] in DROPPING_ACTIONS for kind in KINDS
        )
        rolls_back = any(a == "rollback" for a in self.actions.values())
        #: snapshots and rollbacks, when an action is ``"rollback"``
        self.recovery = Recovery(rollback or RollbackConfig()) if rolls_back else None
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.events: list[AnomalyEvent] = []
        self.events_dropped = 0
        self._warned = WarnedLayers()

    def needs_host_decision(self, dropping_folded: bool) -> bool:
        """Whether every step must be read on the host to act in time.

        ``"stop"``, ``"raise"`` and ``"rollback"`` need the host; ``"skip"`` does not
        when the optimizer drops the step in its own kernel (``dropping_folded``).
        """
        for kind in KINDS:
            action = self.actions[kind]
            if not self.enabled[kind] or action == "warn":
                continue
            if action == "skip" and dropping_folded:
                continue
            return True
        return False

    def decide(
        self,
        findings: Findings,
        label: str,
        dropped: int,
        streak: int,
        act: bool = True,
        nonfinite_parameter: Callable[[], str | None] | None = None,
    ) -> Decision:
        """Count, record and rate-limit; return the actions due for the latest step.

        Args:
            findings: what the rules found since the last read.
            label: which optimizer (``""`` for the only one).
            dropped: steps dropped since the last read (skips and rollbacks).
            streak: dropped steps in a row, the latest included.
            act: ``False`` for a final read (end of training) that only records.
            nonfinite_parameter: on a non-finite step, names the first parameter that
                is itself non-finite (``None`` if none is); such a step is rolled back at
                once (skipping cannot repair it), or stops the run without rollback.
        """
        decision = Decision()
        self.counts["amp_overflow"] += findings.amp_overflows
        for found in findings.kinds():
            action = self.actions[found.kind]
            self.counts[found.kind] += found.count
            event, warn = self._warned.admit(found, action)
            poisoned = None
            if found.kind == "nonfinite" and found.now and act and nonfinite_parameter:
                poisoned = nonfinite_parameter()
                if poisoned is not None:
                    action = "rollback" if self.recovery is not None else "stop"
                    event = dataclasses.replace(
                        event or found.event(action),  # type: ignore[arg-type]
                        forward_origin=f"parameter {poisoned}",
                        action=action,
                    )
                    warn = True
            if event is not None:
                decision.events.append(event)
                if len(self.events) < self.max_events:
                    self.events.append(event)
                else:
                    self.events_dropped += 1
                if warn:
                    decision.warnings.append(
                        f"{event.message()} Seen on {self.counts[found.kind]} step(s) so "
                        "far; further warnings for these layers are held back until they "
                        f"recover. Try: {event.advice()}."
                    )
            if act and found.now and action != "warn":
                chosen = event or found.event(action)
                if chosen is not None:
                    decision.actions.setdefault(action, chosen)
            if poisoned is not None and self.recovery is None and event is not None:
                decision.stop_reason = (
                    f"grad_guard: parameter `{poisoned}` is non-finite; skipping steps cannot "
                    "repair the weights, so the run stops. Use on_nonfinite='rollback' to "
                    "restore the last healthy snapshot instead."
                )
                decision.warnings.append(decision.stop_reason)
        self.counts["skipped_steps"] += dropped
        if decision.stop_reason is not None:
            pass
        elif "stop" in decision.actions:
            decision.stop_reason = decision.actions["stop"].message()
        elif streak >= self.max_consecutive_skips and act:
            last = next(iter(decision.actions.values()), None)
            decision.stop_reason = (
                f"grad_guard: {streak} consecutive optimizer steps were skipped "
                f"(max_consecutive_skips={self.max_consecutive_skips}); stopping training "
                "cleanly. Last anomaly: " + (last.message() if last is not None else "n/a")
            )
            if streak - dropped < self.max_consecutive_skips:  # crossed the limit now
                decision.warnings.append(decision.stop_reason)
        return decision

    def annotate(self, decision: Decision, event: AnomalyEvent, **changes: Any) -> AnomalyEvent:
        """Replace ``event`` (in :attr:`events` and ``decision``) by a copy with ``changes``."""
        new = dataclasses.replace(event, **changes)
        for events in (self.events, decision.events):
            for i, known in enumerate(events):
                if known is event:
                    events[i] = new
        for action, known in list(decision.actions.items()):
            if known is event:
                decision.actions[action] = new
        return new

    def state_dict(self) -> dict[str, Any]:
        return {
            "recovery": self.recovery.state_dict() if self.recovery is not None else None,
            "counts": dict(self.counts),
            "events": [event.to_dict() for event in self.events],
            "events_dropped": self.events_dropped,
            "warned": self._warned.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        counts = state.get("counts", {})
        self.counts = {name: int(counts.get(name, 0)) for name in COUNTERS}
        self.events = [AnomalyEvent.from_dict(e) for e in state.get("events", [])]
        self.events_dropped = int(state.get("events_dropped", 0))
        self._warned.load_state_dict(state.get("warned", {}))
        if self.recovery is not None and state.get("recovery"):
            self.recovery.load_state_dict(state["recovery"])
