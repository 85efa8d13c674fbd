"""Update/parameter ratio far from ~1e-3: the learning rate looks too high or too low."""

from __future__ import annotations

import numpy as np

from grad_guard.report.findings import Finding
from grad_guard.report.rules.base import HEALTHY_UPDATE_RATIO, Evidence


def update_ratio(ev: Evidence) -> list[Finding]:
    """Compare the median update ratio over layers with the healthy ~1e-3."""
    rows = [
        r
        for r in ev.rows
        if r.update_ratio is not None and "dead" not in r.flags and not r.nonfinite
    ]
    if not rows:
        return []
    overall = float(np.median([r.update_ratio for r in rows]))
    factor = ev.limits.update_ratio_factor
    high = [r.name for r in rows if r.update_ratio > HEALTHY_UPDATE_RATIO * factor]
    if overall > HEALTHY_UPDATE_RATIO * factor:
        return [
            Finding(
                "update_ratio_high",
                "warning",
                "Learning rate looks too high",
                [
                    f"median update/parameter ratio over layers is {overall:.2g}, "
                    f"{overall / HEALTHY_UPDATE_RATIO:.0f}x the healthy ~1e-3 (each step rewrites "
                    f"{100 * overall:.1f}% of the weights)",
                    f"{len(high)} layer(s) above {HEALTHY_UPDATE_RATIO * factor:.0e}",
                ],
                ["lower the learning rate by about 10x, or add a warm-up"],
                high,
            )
        ]
    if overall < HEALTHY_UPDATE_RATIO / factor:
        if any("vanishing" in r.flags for r in ev.rows):
            return []  # the vanishing finding already explains why the weights do not move
        return [
            Finding(
                "update_ratio_low",
                "warning",
                "Learning rate looks too low",
                [
                    f"median update/parameter ratio over layers is {overall:.2g}, "
                    f"{HEALTHY_UPDATE_RATIO / overall:.0f}x below the healthy ~1e-3"
                ],
                [
                    "raise the learning rate (try 3-10x), or check a scheduler is not decaying it too early"
                ],
                [r.name for r in rows],
            )
        ]
    return []
