"""Rate limit for anomaly events and warnings: once per layer and kind until it recovers."""

from __future__ import annotations

from typing import Any

from grad_guard.core.detect.findings import KindFindings
from grad_guard.core.events import KINDS, AnomalyEvent

# conditions that persist over many steps: one event until a new layer joins
LASTING_KINDS = frozenset({"vanishing"})


class WarnedLayers:
    """Rate limit for events and warnings: once per layer and kind until it recovers.

    Shared by the Lightning callback and the plain-loop guard, so both report the same
    events.

    Example:
        >>> gate = WarnedLayers()
        >>> gate.layers
        {'nonfinite': set(), 'exploding': set(), 'vanishing': set(), 'loss_spike': set()}
    """

    def __init__(self) -> None:
        self.layers: dict[str, set[str]] = {kind: set() for kind in KINDS}

    def admit(self, found: KindFindings, action: str) -> tuple[AnomalyEvent | None, bool]:
        """The event to record for ``found`` (``None`` if nothing new) and whether to warn.

        A lasting vanishing condition is one event until a new layer joins it; a warning
        is due only for layers not warned about since they last recovered.
        """
        # a rule without layers (the loss) is rate-limited as one pseudo-layer
        involved = found.layers or ((found.kind,) if found.count else ())
        active = found.active or ((found.kind,) if found.now else ())
        warned = self.layers[found.kind]
        new_layers = [name for name in involved if name not in warned]
        self.layers[found.kind] = (warned | set(involved)) & set(active)
        event = found.event(action)
        if event is None or (found.kind in LASTING_KINDS and not new_layers):
            return None, False
        return event, bool(new_layers) and action != "raise"

    def state_dict(self) -> dict[str, list[str]]:
        return {kind: sorted(names) for kind, names in self.layers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers = {kind: set(state.get(kind, ())) for kind in KINDS}
