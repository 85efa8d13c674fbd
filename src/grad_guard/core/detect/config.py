"""Thresholds of the anomaly rules, checked once at construction."""

from __future__ import annotations

from dataclasses import dataclass

from grad_guard._validation import check_float, check_int


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of the three rules, checked at construction.

    Args:
        max_total_norm: absolute limit on the total gradient norm; ``None`` (default)
            for none.
        spike_z_threshold: a total norm more than this many standard deviations above
            the recent mean is a spike; ``None`` turns spike detection off.
        spike_window: how many recent finite total norms the spike statistics use.
        spike_warmup_steps: finite steps seen before spike detection arms (>= 2,
            <= ``spike_window``).
        vanishing_min_norm: a layer norm below this is vanishing; ``None`` (default)
            for no absolute limit.
        vanishing_min_ratio: a layer norm below this fraction of the step's largest
            layer norm is vanishing; ``None`` turns the relative rule off.
        vanishing_patience: consecutive steps a layer must stay below before it is
            reported.
        loss_z_threshold: a training loss more than this many standard deviations above
            its recent mean is a loss spike; ``None`` turns the loss z-score off (a
            non-finite loss is still reported).
        loss_window: how many recent finite losses the loss statistics use.
        loss_warmup_steps: finite losses seen before the loss rule arms (>= 2,
            <= ``loss_window``).

    Raises:
        ValueError: if a value is out of range; the message names the argument.

    Example:
        >>> DetectionConfig(spike_window=10, spike_warmup_steps=20)
        Traceback (most recent call last):
        ...
        ValueError: `spike_warmup_steps` must be <= `spike_window` (10), got 20
    """

    max_total_norm: float | None = None
    spike_z_threshold: float | None = 6.0
    spike_window: int = 128
    spike_warmup_steps: int = 64
    vanishing_min_norm: float | None = None
    vanishing_min_ratio: float | None = 1e-5
    vanishing_patience: int = 10
    loss_z_threshold: float | None = 6.0
    loss_window: int = 128
    loss_warmup_steps: int = 32

    def __post_init__(self) -> None:
        # frozen dataclass: store the normalised floats once, at construction
        for name in (
            "max_total_norm",
            "spike_z_threshold",
            "vanishing_min_norm",
            "loss_z_threshold",
        ):
            object.__setattr__(self, name, check_float(name, getattr(self, name), allow_none=True))
        ratio = check_float(
            "vanishing_min_ratio",
            self.vanishing_min_ratio,
            0.0,
            1.0,
            inclusive_max=False,
            allow_none=True,
        )
        object.__setattr__(self, "vanishing_min_ratio", ratio)
        for window, warmup in (
            ("spike_window", "spike_warmup_steps"),
            ("loss_window", "loss_warmup_steps"),
        ):
            check_int(window, getattr(self, window), minimum=2)
            check_int(warmup, getattr(self, warmup), minimum=2)
            if getattr(self, warmup) > getattr(self, window):
                raise ValueError(
                    f"`{warmup}` must be <= `{window}` ({getattr(self, window)}), "
                    f"got {getattr(self, warmup)!r}"
                )
        check_int("vanishing_patience", self.vanishing_patience, minimum=1)

    @property
    def detects_exploding(self) -> bool:
        return self.max_total_norm is not None or self.spike_z_threshold is not None

    @property
    def detects_vanishing(self) -> bool:
        return self.vanishing_min_norm is not None or self.vanishing_min_ratio is not None
