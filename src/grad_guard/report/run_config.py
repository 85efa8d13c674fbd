"""What a run already does: its precision, clipping and detection settings.

GradGuard logs them once at fit start as the TensorBoard text tag ``grad_guard/config``
(one JSON object, see :data:`CONFIG_TAG`). The report reads them back so that its advice
never recommends what the run already uses, and so that the run's precision needs no
command-line option.

Example:
    >>> config = RunConfig.from_json('{"version": 1, "precision": "16-mixed", '
    ...     '"clipping": {"algorithm": "AutoClip", "repr": "AutoClip(percentile=10.0)"}, '
    ...     '"detection": {"on_nonfinite": "skip"}}')
    >>> config.clip_algorithm, config.action("on_nonfinite"), config.action("on_exploding")
    ('AutoClip', 'skip', None)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CONFIG_TAG = "grad_guard/config"
"""TensorBoard text tag holding the run configuration (JSON, written at step 0)."""

CONFIG_VERSION = 1

CLIP_ALGORITHMS = ("NormClip", "ValueClip", "AutoClip", "ZClip", "AGC")
"""Clipping algorithm names the advice knows."""


@dataclass
class RunConfig:
    """The grad_guard settings of one run.

    Attributes:
        precision: the Trainer's precision (``"32-true"``, ``"16-mixed"``...), if known.
        log_every_n_steps: the monitor's logging interval, if known.
        clipping: ``None`` (no clipping) or ``{"algorithm": "AutoClip", "repr": ...}``.
        detection: ``None`` (no detection) or the actions, ``{"on_nonfinite": ...}``.
        monitor: whether a gradient-norm monitor ran.
        activations: whether activation statistics were logged.
        raw: the whole JSON object as read.
    """

    precision: str | None = None
    log_every_n_steps: int | None = None
    clipping: dict[str, Any] | None = None
    detection: dict[str, Any] | None = None
    monitor: bool = True
    activations: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def clip_algorithm(self) -> str | None:
        """The clipping algorithm's class name (``"AutoClip"``), or ``None`` without clipping."""
        if not self.clipping:
            return None
        name = self.clipping.get("algorithm")
        return str(name) if name else None

    @property
    def clip_repr(self) -> str:
        """The clipper as the run built it, e.g. ``"AutoClip(percentile=10.0, window=1000)"``."""
        if not self.clipping:
            return ""
        return str(self.clipping.get("repr") or self.clip_algorithm or "")

    def action(self, name: str) -> str | None:
        """Detection's action ``name`` (``"on_nonfinite"``...), ``None`` without detection."""
        if not self.detection:
            return None
        value = self.detection.get(name)
        return str(value) if value is not None else None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from the decoded JSON object (unknown keys are kept in :attr:`raw`).

        Raises:
            ValueError: if ``data`` is not a mapping or a field has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a run config must be a JSON object, got {type(data).__name__}")
        clipping = data.get("clipping")
        detection = data.get("detection")
        for name, value in (("clipping", clipping), ("detection", detection)):
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(
                    f"`{name}` in the run config must be an object or null, got {value!r}"
                )
        interval = data.get("log_every_n_steps")
        precision = data.get("precision")
        return cls(
            precision=str(precision) if precision not in (None, "") else None,
            log_every_n_steps=int(interval) if isinstance(interval, int) else None,
            clipping=dict(clipping) if clipping else None,
            detection=dict(detection) if detection else None,
            monitor=bool(data.get("monitor", True)),
            activations=bool(data.get("activations", False)),
            raw=dict(data),
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse the text of the ``grad_guard/config`` tag.

        Raises:
            ValueError: if ``text`` is not a JSON object of the expected shape.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the run config is not JSON ({err}): {text[:80]!r}") from err
        return cls.from_mapping(data)

    def describe(self) -> str:
        """One line for the report, e.g. ``"precision 16-mixed; clipping AutoClip(...)"``."""
        parts = [f"precision {self.precision}" if self.precision else "precision unknown"]
        parts.append(f"clipping {self.clip_repr}" if self.clipping else "no clipping")
        if self.detection:
            actions = ", ".join(f"{k}={v}" for k, v in self.detection.items())
            parts.append(f"detection {actions}")
        else:
            parts.append("no anomaly detection")
        return "; ".join(parts)
