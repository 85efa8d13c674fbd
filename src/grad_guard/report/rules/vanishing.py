"""Vanishing gradients: the input-end layers get orders of magnitude less than the output end.

Two findings: ``vanishing_activation`` (saturating activations or a small init: switch
to ReLU-family + He init) and ``vanishing_depth`` (the shrinkage grows layer by layer
in a plain stack: residual connections, normalization).
"""

from __future__ import annotations

import math

import numpy as np

from grad_guard.report.findings import Finding
from grad_guard.report.model_info import MAX_SLOPE
from grad_guard.report.rules.base import Evidence, fmt, names


def vanishing(ev: Evidence) -> list[Finding]:
    """Find vanishing gradients in the depth profile (and in detection's counts)."""
    totals, info = ev.totals, ev.info
    profile = ev.depth_profile()
    findings: list[Finding] = []
    if len(profile) < 3:
        if totals.get("vanishing"):
            findings.append(
                Finding(
                    "vanishing_activation",
                    "warning",
                    "Vanishing gradients reported by detection",
                    [f"detection counted {totals['vanishing']} vanishing step(s)"],
                    [
                        "use ReLU-family activations with He init, BatchNorm/LayerNorm, or residual connections"
                    ],
                )
            )
        return findings
    layer_names = [n for n, _ in profile]
    logs = np.log10([v for _, v in profile])
    third = max(1, len(profile) // 3)
    input_end, output_end = float(np.median(logs[:third])), float(np.median(logs[-third:]))
    orders = output_end - input_end
    first, last = profile[0], profile[-1]
    detected = int(totals.get("vanishing", 0))
    if orders < ev.limits.vanishing_orders and not (detected and orders > 1.0):
        return findings

    low = [
        n for n, v in profile if math.log10(v) < output_end - ev.limits.vanishing_orders
    ] or layer_names[:third]
    steps = np.diff(logs)
    rising = float(np.mean(steps > 0)) if len(steps) else 0.0
    per_layer = 10 ** float(np.polyfit(np.arange(len(logs)), logs, 1)[0]) if len(logs) > 1 else 1.0
    evidence = [
        f"gradients at the input end are {orders:.1f} orders of magnitude smaller than at the "
        f"output end (median of the first vs last third of the layers; {first[0]}: "
        f"{fmt(first[1])}, {last[0]}: {fmt(last[1])})",
    ]
    if detected:
        evidence.append(f"detection counted {detected} vanishing step(s)")
    frozen = [
        r.name
        for r in ev.rows
        if r.name in low and r.update_ratio is not None and r.update_ratio < 1e-6
    ]
    if frozen:
        evidence.append(
            f"{len(frozen)} layer(s) barely move (update ratio < 1e-6): {names(frozen)}"
        )

    # rule 1: saturating activations / init
    advice: list[str] = []
    if info is None:
        evidence.append("model not available: activation types unknown")
        advice.append(
            "if the model uses sigmoid or tanh: switch to ReLU-family activations "
            "(ReLU, LeakyReLU, GELU), whose derivative is 1 for active units instead of at "
            "most 0.25 (sigmoid), and initialise with He (Kaiming) init"
        )
    else:
        guess = info.init_guess()
        if info.saturating:
            count = sum(info.activations[a] for a in info.saturating)
            evidence.append(
                f"the model has {count} saturating activation module(s) ({', '.join(info.saturating)}): "
                "their derivative is at most "
                + " / ".join(f"{MAX_SLOPE.get(a, '1')} ({a})" for a in info.saturating)
                + " and near 0 once they saturate, so each layer shrinks the backward signal"
            )
            advice.append(
                "replace " + "/".join(info.saturating) + " with a ReLU-family activation "
                "(nn.ReLU, nn.LeakyReLU, nn.GELU) and use He (Kaiming) init: "
                "grad_guard.models.init_weights(model, 'he', 'relu') or "
                "DeepMLP(..., activation='relu', init='he')"
            )
        if info.weight_scale is not None:
            evidence.append(
                f"weights have std*sqrt(fan_in) ~ {info.weight_scale:.2f}"
                + (
                    f" (looks like '{guess}' init; He gives 1.41, PyTorch's default 0.58)"
                    if guess
                    else " (He gives 1.41, PyTorch's default 0.58)"
                )
            )
        if not info.saturating and guess in ("default", "xavier"):
            advice.append(
                f"the weights look like '{guess}' init, too small for ReLU-family stacks: use He "
                "(Kaiming) init, e.g. grad_guard.models.init_weights(model, 'he', 'relu')"
            )
    if advice:
        findings.append(
            Finding(
                "vanishing_activation",
                "warning",
                "Vanishing gradients: the input-end layers get almost no gradient",
                evidence,
                advice,
                low,
            )
        )

    # rule 2: plain deep stack -> shortcuts / normalization
    growing = rising >= 0.7 and per_layer > 1.0
    plain = info is None or not info.residual
    if growing and plain:
        depth_ev = [
            f"the gradient shrinks by about {per_layer:.2g}x per layer going towards the input, "
            f"in {100 * rising:.0f}% of consecutive layer pairs over {len(profile)} layers"
        ]
        target = (
            "grad_guard.models.ResNet (CNN)"
            if info and info.convolutional
            else "grad_guard.models.ResidualMLP (MLP)"
            if info
            else "grad_guard.models.ResidualMLP (MLP) or grad_guard.models.ResNet (CNN)"
        )
        if info is not None:
            depth_ev.append(
                f"the model is a plain stack of {info.depth} weight layers without residual "
                "shortcuts" + (" and without normalization layers" if not info.norm_layers else "")
            )
        tip = [
            f"add residual connections (x + f(x)) so the gradient reaches early layers through the identity "
            f"path, as in {target}"
        ]
        if info is None or not info.norm_layers:
            tip.append(
                "add BatchNorm (or LayerNorm) inside each block to keep activations at unit scale"
            )
        findings.append(
            Finding(
                "vanishing_depth",
                "warning",
                "Vanishing grows with depth in a plain stack",
                depth_ev + evidence[:1],
                tip,
                low,
            )
        )
    elif growing and not advice:
        findings.append(
            Finding(
                "vanishing_depth",
                "warning",
                "Vanishing gradients in a residual model",
                evidence,
                [
                    "check that the residual branches end in a normalization or a small-init layer and "
                    "that the shortcuts are not gated by saturating activations"
                ],
                low,
            )
        )
    return findings
