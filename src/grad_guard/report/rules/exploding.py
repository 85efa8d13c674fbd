"""Exploding gradients: blow-ups, spikes, a drifting scale, or clipping on most steps.

The advice names a clipper for the situation (AutoClip for a drifting scale or
frequent clipping, ZClip for isolated spikes, AGC for normalizer-free models) and never
recommends the one the run already uses: with the run's configuration at hand
(``grad_guard/config``) it says how to tune that clipper instead, or which one to
switch to.
"""

from __future__ import annotations

import math
import re

import numpy as np

from grad_guard.report.findings import Finding, Severity
from grad_guard.report.rules.base import Evidence, fmt

# (algorithm, how to use it, why it fits) per situation, best first
_USE = {
    "AutoClip": "GradientClipping(AutoClip())",
    "ZClip": "GradientClipping(ZClip())",
    "AGC": "GradientClipping(AGC())",
    "NormClip": "GradientClipping(NormClip(max_norm))",
}
_RANKED: dict[str, list[tuple[str, str]]] = {
    "frequent": [
        (
            "AutoClip",
            "its threshold is a percentile of the norms seen so far, so it follows "
            "the scale instead of clipping almost every step",
        ),
        ("ZClip", "it clips only steps far above the running mean, leaving normal steps alone"),
    ],
    "drifting": [
        (
            "AutoClip",
            "the norm's scale drifts over the run, and a percentile of the history "
            "follows it where a fixed max_norm would be too tight or too loose",
        ),
        ("ZClip", "its running mean follows the scale and it clips only the outliers"),
    ],
    "spikes": [
        (
            "ZClip",
            "the norm is stable apart from isolated spikes, which a z-score against its "
            "running mean/variance catches without touching normal steps",
        ),
        ("AutoClip", "a percentile of the norms seen so far caps the spikes"),
    ],
    "normalizer_free": [
        (
            "AGC",
            "the model has no normalization layers, and unit-wise clipping relative to "
            "each weight's norm is what keeps normalizer-free/large-batch nets stable",
        ),
        ("ZClip", "it cuts the blow-up at its first spike"),
    ],
    "blow_up": [
        ("ZClip", "it cuts the blow-up at its first spike"),
        ("NormClip", "a fixed max_norm near the typical norm before the blow-up caps it"),
        ("AGC", "unit-wise clipping relative to each weight's norm"),
    ],
}
_TUNE = {
    "AutoClip": "lower its percentile (e.g. 5) or its window so the threshold reacts sooner",
    "ZClip": "lower z_threshold (e.g. 2.0) or alpha so spikes are caught sooner, and keep "
    "warmup_steps short",
    "AGC": "lower clip_factor (e.g. 0.005)",
    "NormClip": "lower max_norm to about the typical norm before the blow-up ({typical})",
    "ValueClip": "value clipping changes the gradient's direction: a norm-based clipper "
    "(NormClip, ZClip, AutoClip) keeps it",
}
_FREQUENT_TUNE = {
    "AutoClip": "it clips more steps than its percentile implies because the norm keeps "
    "rising above its own history: lower the learning rate",
    "ZClip": "raise z_threshold (e.g. 3.0): at this rate it clips normal steps, not outliers",
    "NormClip": "raise max_norm to about the typical norm ({typical})",
    "ValueClip": "raise clip_value, or clip the norm instead (NormClip, AutoClip)",
    "AGC": "raise clip_factor (e.g. 0.02)",
}


def spikes(totals: np.ndarray, factor: float) -> list[int]:
    """Steps whose total norm is ``factor`` x above both the recent and the run's median.

    The run's median keeps a converged run, whose norms shrink, from calling an ordinary
    batch a spike.
    """
    finite = totals[np.isfinite(totals)]
    overall = float(np.median(finite)) if finite.size else math.inf
    found = []
    for j in range(4, len(totals)):
        previous = totals[max(0, j - 8) : j]
        previous = previous[np.isfinite(previous)]
        if (
            previous.size >= 4
            and np.isfinite(totals[j])
            and totals[j] > factor * max(float(np.median(previous)), overall)
        ):
            found.append(j)
    return found


def _autoclip_by_design(ev: Evidence) -> bool:
    """AutoClip clips every step above its percentile: most steps, by design."""
    if ev.clip_algorithm != "AutoClip" or ev.config is None:
        return False
    found = re.search(r"percentile=([0-9.]+)", ev.config.clip_repr)
    percentile = float(found.group(1)) if found else 10.0
    clipped = ev.totals.get("clipped_fraction") or 0.0
    return clipped <= 1.0 - percentile / 100.0 + 0.05


def _clip_advice(
    ev: Evidence, situation: str, typical: float | None
) -> tuple[list[str], list[str]]:
    """(evidence, advice) about clipping, given what the run already uses."""
    used = ev.clip_algorithm
    ranked = _RANKED[situation]
    evidence = [f"the run already clips with {ev.config.clip_repr}"] if used and ev.config else []
    advice: list[str] = []
    tune = _FREQUENT_TUNE if situation == "frequent" else _TUNE
    if used in tune:
        advice.append(f"tune the run's {used}: " + tune[used].format(typical=fmt(typical)))
    best = next((c for c in ranked if c[0] != used), None)
    if best is not None:
        name, why = best
        verb = "clip with" if not used else f"{'or ' if advice else ''}switch from {used} to"
        advice.append(f"{verb} {name} ({_USE[name]}): {why}")
    if "AGC" not in (used, best[0] if best else None):
        advice.append(
            "for large-batch or normalizer-free models prefer AGC (unit-wise, relative to weight norms)"
        )
    return evidence, advice


def exploding(ev: Evidence) -> list[Finding]:
    """Find blow-ups, spikes, a drifting scale and clipping that acts on most steps."""
    totals, info = ev.totals, ev.info
    values = ev.total_norms
    finite_idx = np.nonzero(np.isfinite(values) & (values > 0))[0]
    evidence: list[str] = []
    found_spikes = spikes(values, ev.limits.spike_factor)
    drift = None
    if finite_idx.size >= 8:
        quarter = max(2, finite_idx.size // 4)
        early = float(np.median(values[finite_idx[:quarter]]))
        late = float(np.median(values[finite_idx[-quarter:]]))
        drift = late / early if early > 0 else None
    steps = ev.history.steps
    blew_up = False
    if finite_idx.size >= 2:
        first_value, peak = values[finite_idx[0]], float(np.max(values[finite_idx]))
        peak_idx = int(finite_idx[np.argmax(values[finite_idx])])
        later_nonfinite = np.nonzero(~np.isfinite(values[peak_idx:]))[0]
        if peak > 100 * first_value and (later_nonfinite.size or peak_idx >= finite_idx[-1] - 1):
            blew_up = True
            evidence.append(
                f"total gradient norm grew from {fmt(first_value)} (step {steps[finite_idx[0]]}) "
                f"to {fmt(peak)} (step {steps[peak_idx]})"
                + (
                    f" and became non-finite at step {steps[peak_idx + int(later_nonfinite[0])]}"
                    if later_nonfinite.size
                    else ""
                )
            )
    if found_spikes:
        worst = max(found_spikes, key=lambda j: values[j])
        evidence.append(
            f"{len(found_spikes)} spike(s) of the total norm above {ev.limits.spike_factor:g}x the "
            "median of the previous logged steps and of the run (largest "
            f"{fmt(values[worst])} at step {steps[worst]})"
        )
    drifting = drift is not None and (drift >= ev.limits.drift_factor)
    if drifting:
        evidence.append(
            f"the typical total norm drifted {drift:.2g}x from the first to the last quarter of the run"
        )
    if totals.get("exploding"):
        evidence.append(f"detection counted {totals['exploding']} exploding step(s)")
    clipped = totals.get("clipped_fraction")
    frequent = (
        clipped is not None
        and clipped >= ev.limits.frequent_clipping
        and not _autoclip_by_design(ev)
    )
    if frequent:
        evidence.append(
            f"clipping acted on {100 * clipped:.0f}% of the steps: the threshold is below the typical "
            "norm, so clipping has turned into a smaller learning rate"
        )
    if not evidence:
        return []

    advice = ["lower the learning rate (try 3-10x smaller)"]
    # where the trouble starts, in kept columns (evenly spread over the run)
    onset = found_spikes[0] if found_spikes else None
    if blew_up:
        rising = np.nonzero(values[finite_idx] > 10 * values[finite_idx[0]])[0]
        onset = int(finite_idx[rising[0]]) if rising.size else onset
    if onset is not None and onset < max(10, 0.1 * len(values)):
        advice.append(
            "add a learning-rate warm-up (e.g. linear over the first 5-10% of steps): the trouble "
            "starts early, when the weights are least adapted to a large learning rate"
        )
    if frequent:
        situation = "frequent"
    elif drifting:
        situation = "drifting"
    elif found_spikes and not blew_up:
        situation = "spikes"
    elif info is not None and not info.norm_layers:
        situation = "normalizer_free"
    else:
        situation = "blow_up"
    before = values[finite_idx[: max(1, finite_idx.size // 4)]] if finite_idx.size else values[:0]
    typical = float(np.median(before)) if before.size else None
    clip_evidence, clip_advice = _clip_advice(ev, situation, typical)
    evidence += clip_evidence
    advice += clip_advice
    severity: Severity = "critical" if blew_up else "warning"
    if blew_up:
        title = "Exploding gradients: the norm blew up"
    elif found_spikes:
        title = "Exploding gradients: spikes in the total norm"
    elif drifting:
        title = "Exploding gradients: the norm's scale keeps growing"
    elif frequent:
        title = "Frequent clipping"
    else:
        title = "Exploding gradients reported by detection"
    return [Finding("exploding", severity, title, evidence, advice)]
