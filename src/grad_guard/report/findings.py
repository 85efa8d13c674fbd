"""The report's pieces of data: one table row per layer, one finding per diagnosis."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["critical", "warning", "info"]


@dataclass
class LayerRow:
    """One line of the report's table (norms over the kept, finite records).

    Attributes:
        name: the layer.
        records: logged steps on which the layer was recorded.
        min / median / max: gradient norm over the finite records (``None`` if none).
        last_param_norm: latest parameter norm.
        update_ratio: median ``||delta theta|| / ||theta||``.
        zero / no_grad / nonfinite: records with a zero norm, no gradient, NaN/Inf.
        events: anomaly kind -> number of events that named the layer.
        flags: short marks (``"dead"``, ``"vanishing"``, ``"NaN/Inf x3"``).
    """

    name: str
    records: int
    min: float | None
    median: float | None
    max: float | None
    last_param_norm: float | None
    update_ratio: float | None
    zero: int
    no_grad: int
    nonfinite: int
    events: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def events_text(self) -> str:
        """Events and flags as one cell, e.g. ``"exploding x2, dead"`` (``"-"`` if none)."""
        parts = [f"{kind} x{count}" for kind, count in self.events.items()]
        parts += self.flags
        return ", ".join(parts) or "-"


@dataclass
class Finding:
    """One diagnosis: what was seen (evidence with numbers) and what to try (advice).

    Attributes:
        rule: the rule that fired (``"vanishing_activation"``, ``"exploding"``...).
        severity: ``"critical"``, ``"warning"`` or ``"info"``.
        title: one line.
        evidence: sentences citing the numbers the finding rests on.
        advice: what to try, most useful first.
        layers: the layers involved.
    """

    rule: str
    severity: Severity
    title: str
    evidence: list[str]
    advice: list[str]
    layers: list[str] = field(default_factory=list)
