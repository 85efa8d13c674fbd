"""Non-finite (NaN/Inf) gradients: where they started, and what the precision says.

Under fp16 the advice is bf16 or loss scaling; in full precision it points at the
loss/data and at a diverging run. Advice about skipping bad steps respects the run's
own ``on_nonfinite`` action when its configuration was logged.
"""

from __future__ import annotations

import numpy as np

from grad_guard.report.findings import Finding, Severity
from grad_guard.report.precision import BF16, FP16, TRUE_FP16
from grad_guard.report.rules.base import Evidence, names


def _skip_advice(ev: Evidence, evidence: list[str]) -> str | None:
    """How to keep bad steps off the weights, unless the run already does."""
    if ev.config is None:
        return "keep on_nonfinite='skip' so bad steps never reach the weights"
    action = ev.config.action("on_nonfinite")
    if action in ("skip", "rollback"):
        evidence.append(f"the run's detection already acts on them (on_nonfinite={action!r})")
        return None
    if action is None:
        return (
            "add GradientAnomalyDetection(on_nonfinite='skip') (or GradGuard()) so bad steps "
            "never reach the weights"
        )
    return f"set on_nonfinite='skip' (the run uses {action!r}) so bad steps never reach the weights"


def nonfinite(ev: Evidence) -> list[Finding]:
    """Find NaN/Inf gradients and AMP overflows."""
    totals = ev.totals
    bad_layers = [r.name for r in ev.rows if r.nonfinite]
    count = int(totals.get("nonfinite", 0))
    overflows = int(totals.get("amp_overflow", 0))
    if not bad_layers and not count and not overflows:
        return []
    evidence = []
    data = ev.history.matrix("grad_norm").filled(0.0)
    bad_columns = np.nonzero((~np.isfinite(data)).any(axis=0))[0]
    if bad_columns.size:
        j = int(bad_columns[0])
        first = [ev.history.layers[i] for i in np.nonzero(~np.isfinite(data[:, j]))[0]]
        evidence.append(
            f"first non-finite gradient at logged step {ev.history.steps[j]} in {len(first)} "
            f"layer(s): {names(first)}"
        )
    if bad_layers:
        records = sum(r.nonfinite for r in ev.rows)
        evidence.append(
            f"{len(bad_layers)} layer(s) had NaN/Inf gradients ({records} layer-records)"
        )
    if count:
        evidence.append(f"detection counted {count} non-finite step(s)")
    if overflows:
        evidence.append(f"the AMP GradScaler skipped {overflows} step(s) for overflow")
    precision = ev.precision
    kind = (precision or "").lower()
    if kind in FP16:
        return [_fp16(ev, evidence, bad_layers, count, overflows)]
    skip = _skip_advice(ev, evidence)
    clip = (
        f"lower the learning rate (the run already clips with {ev.config.clip_repr})"
        if ev.clip_algorithm and ev.config is not None
        else "lower the learning rate and clip gradients"
    )
    advice = [
        "non-finite gradients in full precision come from a diverging run (see exploding "
        "gradients) or from the loss/data: log(0), division by zero, sqrt at 0, NaN inputs; run "
        "a few steps with torch.autograd.set_detect_anomaly(True) to find the operation",
        clip + (f"; {skip}" if skip else ""),
    ]
    if precision is None:
        advice.append(
            "if this run used fp16 AMP (precision='16-mixed'), switch to 'bf16-mixed' or check "
            "that loss scaling is on"
        )
    elif kind in BF16:
        evidence.append(
            f"precision is {precision!r} (same exponent range as fp32): not an fp16 overflow"
        )
    return [
        Finding(
            "nonfinite", "critical", "Non-finite (NaN/Inf) gradients", evidence, advice, bad_layers
        )
    ]


def _fp16(
    ev: Evidence, evidence: list[str], bad_layers: list[str], count: int, overflows: int
) -> Finding:
    kind = str(ev.precision).lower()
    evidence.append(f"precision is {ev.precision!r}: fp16 overflows above 65504")
    advice = [
        "train with precision='bf16-mixed' if the hardware supports it (Ampere+ GPUs, TPUs, "
        "CPUs): bf16 has fp32's exponent range, so gradients do not overflow"
    ]
    if kind in TRUE_FP16:
        advice.append(
            "or use precision='16-mixed', which keeps fp32 master weights and scales the loss "
            "(GradScaler) so that overflowing steps are skipped and the scale is lowered"
        )
    else:
        skip = _skip_advice(ev, evidence)
        advice.append(
            "or keep '16-mixed' with loss scaling (GradScaler) and a lower init_scale / growth "
            "so overflows stay rare" + (f"; {skip}" if skip else "")
        )
    only_overflows = not bad_layers and not count
    rate = overflows / max(ev.history.records, 1)
    severity: Severity = "info" if only_overflows and rate < 0.05 else "critical"
    return Finding(
        "nonfinite_amp",
        severity,
        "Non-finite gradients under fp16 mixed precision",
        evidence,
        advice,
        bad_layers,
    )
