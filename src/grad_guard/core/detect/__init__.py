"""Vanishing, exploding, non-finite gradient and loss-spike rules, evaluated on the device.

:class:`GradientAnomalyDetector` takes the :class:`~grad_guard.core.stats.GradientStats`
of each optimizer step (and optionally its loss) and updates its statistics and flags
with tensor operations only: no ``.item()``, ``bool()`` or ``.cpu()``. The flags
accumulate on the device until somebody packs them (one small tensor) and copies them to
the host, together with whatever else that step reports.

The rules:

* **non-finite**: a layer whose gradient holds NaN/Inf. When the step's GradScaler
  found the overflow and will skip the step itself (``16-mixed``), the step is counted
  as an AMP overflow instead, which is normal mixed-precision behaviour.
* **exploding**: the total norm is above ``max_total_norm``, or it is a *spike*: more
  than ``spike_z_threshold`` standard deviations above the mean of the last
  ``spike_window`` finite total norms (armed after ``spike_warmup_steps`` of them).
  Per-layer exponential moving statistics name the layers whose own norm spiked. A
  spike enters the statistics clipped to the threshold, so one outlier cannot inflate
  the spread and hide the next one.
* **vanishing**: a layer's norm is below ``vanishing_min_norm``, or below
  ``vanishing_min_ratio`` times the largest layer norm of the same step, for
  ``vanishing_patience`` consecutive steps. Layers without a gradient this step are not
  vanishing, and a lone 1-D tensor (bias, norm scale) is not judged.
* **loss spike**: the training loss is non-finite, or more than ``loss_z_threshold``
  standard deviations above the mean of the last ``loss_window`` finite losses.

Modules: :mod:`.config` (thresholds), :mod:`.zscore` (device statistics),
:mod:`.vanishing`, :mod:`.findings` (host records and the packed layout),
:mod:`.ratelimit` (once per layer until it recovers), :mod:`.detector`.
"""

from grad_guard.core.detect.config import DetectionConfig
from grad_guard.core.detect.detector import GradientAnomalyDetector
from grad_guard.core.detect.findings import Findings, KindFindings, packed_size
from grad_guard.core.detect.ratelimit import WarnedLayers
from grad_guard.core.detect.vanishing import judged_for_vanishing, vanishing_layers
from grad_guard.core.detect.zscore import EMAZScore, RollingZScore
from grad_guard.core.events import (
    AnomalyEvent,
    GradientAnomalyError,
    GradientAnomalyWarning,
)

__all__ = [
    "AnomalyEvent",
    "DetectionConfig",
    "EMAZScore",
    "Findings",
    "GradientAnomalyDetector",
    "GradientAnomalyError",
    "GradientAnomalyWarning",
    "KindFindings",
    "RollingZScore",
    "WarnedLayers",
    "judged_for_vanishing",
    "packed_size",
    "vanishing_layers",
]
