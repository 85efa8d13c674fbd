"""Activation rules: the causes behind vanishing and exploding gradients.

- saturated sigmoid/tanh units (their derivative is ~0 there: gradients vanish);
- dead ReLU units (0 for every sample: no gradient flows through them);
- activation scale growing by a steady factor per layer (explodes with depth);
- non-finite layer outputs (the first layer in forward order is named).

:func:`diagnose_activations` is the pure function (per-layer statistics in, findings
out); :func:`activations` is the registry rule, reading ``evidence.activations`` (an
:class:`~grad_guard.core.activation_history.ActivationHistory` or a mapping layer ->
:class:`~grad_guard.core.activations.LayerActivations`, forward order) when the report
was given one, and doing nothing otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from grad_guard.core.activation_history import ActivationHistory
from grad_guard.core.activations import LayerActivations
from grad_guard.report.findings import Finding

SATURATED = 0.5
"""A layer whose activation outputs are saturated at least this often is flagged."""
DEAD = 0.5
"""A layer with at least this fraction of dead units is flagged."""
GROWTH = 2.0
"""Activation std growing by at least this factor per layer (over >= 3 layers) is flagged."""


def layer_ranges(chosen: Sequence[str], order: Sequence[str]) -> str:
    """Consecutive runs of ``chosen`` (in ``order``) as ``"fc3-fc7, fc9"``.

    Example:
        >>> layer_ranges(["fc3", "fc4", "fc5", "fc9"], [f"fc{i}" for i in range(1, 10)])
        'fc3-fc5, fc9'
    """
    wanted = set(chosen)
    runs: list[list[str]] = []
    previous = False
    for name in order:
        if name in wanted:
            if previous:
                runs[-1].append(name)
            else:
                runs.append([name])
        previous = name in wanted
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _percent(values: Sequence[float]) -> str:
    ordered = sorted(values)
    return f"{100 * ordered[len(ordered) // 2]:.0f} %"


def _family(stats: Mapping[str, LayerActivations], chosen: Sequence[str], default: str) -> str:
    kinds = sorted({stats[n].activation.lower() for n in chosen if stats[n].activation})
    return "/".join(kinds) or default


def diagnose_activations(
    stats: Mapping[str, LayerActivations],
    saturated: float = SATURATED,
    dead: float = DEAD,
    growth: float = GROWTH,
) -> list[Finding]:
    """Findings about per-layer activation statistics (``stats`` in forward order).

    Example:
        >>> stats = {f"fc{i}": LayerActivations(0.0, 20.0, 0.0, saturated_fraction=0.95,
        ...          activation="Sigmoid") for i in range(3, 8)}
        >>> diagnose_activations(stats)[0].title
        'fc3-fc7: sigmoid outputs 95 % saturated -> vanishing gradients; use ReLU + He init'
    """
    order = list(stats)
    findings: list[Finding] = []
    bad = [n for n in order if (stats[n].nonfinite_fraction or 0.0) > 0.0]
    if bad:
        first = stats[bad[0]]
        findings.append(
            Finding(
                "nonfinite_activations",
                "critical",
                f"{bad[0]}: {100 * first.nonfinite_fraction:.3g} % of outputs NaN/Inf "
                "(first layer in forward order)",
                [f"non-finite outputs in {layer_ranges(bad, order)}"],
                [
                    "the first layer named is where the forward pass first went non-finite: "
                    "check its inputs and parameters, lower the learning rate, or use bf16 "
                    "instead of fp16"
                ],
                bad,
            )
        )
    sat = [n for n in order if (stats[n].saturated_fraction or 0.0) >= saturated]
    if sat:
        family = _family(stats, sat, "sigmoid/tanh")
        fraction = _percent([stats[n].saturated_fraction for n in sat])
        findings.append(
            Finding(
                "saturated_activations",
                "warning",
                f"{layer_ranges(sat, order)}: {family} outputs {fraction} saturated "
                "-> vanishing gradients; use ReLU + He init",
                [
                    f"{n}: {100 * stats[n].saturated_fraction:.0f} % of outputs near the "
                    f"bounds (pre-activation std {stats[n].std:.3g})"
                    for n in sat
                ],
                [
                    "use ReLU + He init",
                    "or keep the activation and normalize its input (BatchNorm/LayerNorm), "
                    "with Xavier init and a smaller weight scale",
                ],
                sat,
            )
        )
    dead_layers = [n for n in order if (stats[n].dead_fraction or 0.0) >= dead]
    if dead_layers:
        family = _family(stats, dead_layers, "ReLU")
        family = "ReLU" if family == "relu" else family
        fraction = _percent([stats[n].dead_fraction for n in dead_layers])
        findings.append(
            Finding(
                "dead_units",
                "warning",
                f"{layer_ranges(dead_layers, order)}: {fraction} of {family} units dead "
                "-> lower the LR, LeakyReLU, or check the bias init",
                [
                    f"{n}: {100 * stats[n].dead_fraction:.0f} % of units 0 for the whole "
                    f"batch (pre-activation mean {stats[n].mean:.3g})"
                    for n in dead_layers
                ],
                [
                    "lower the learning rate",
                    "use LeakyReLU (or GELU)",
                    "check the bias init (a large negative bias kills units from the start)",
                ],
                dead_layers,
            )
        )
    findings += _scale_growth(stats, growth)
    return findings


def _scale_growth(stats: Mapping[str, LayerActivations], growth: float) -> list[Finding]:
    profile = [(n, s.std) for n, s in stats.items() if math.isfinite(s.std) and s.std > 0]
    if len(profile) < 3:
        return []
    (first, low), (last, high) = profile[0], profile[-1]
    factor = (high / low) ** (1 / (len(profile) - 1))
    rising = sum(b[1] > a[1] for a, b in itertools.pairwise(profile))
    if factor < growth or rising < 2 * (len(profile) - 1) / 3:
        return []
    return [
        Finding(
            "activation_growth",
            "warning",
            f"activation scale grows x{factor:.1f} per layer -> add normalization or "
            "residual scaling",
            [f"output std {low:.3g} at {first}, {high:.3g} at {last} ({len(profile)} layers)"],
            [
                "add normalization (BatchNorm/LayerNorm)",
                "or scale residual branches down (e.g. by 1/sqrt(depth)); check the init "
                "(He for ReLU, Xavier for tanh)",
            ],
            [n for n, _ in profile],
        )
    ]


def activations(ev: Any) -> list[Finding]:
    """The registry rule: diagnose ``ev.activations`` if the report has it."""
    data = getattr(ev, "activations", None)
    if isinstance(data, ActivationHistory):
        data = data.summary()
    if not data:
        return []
    return diagnose_activations(data)
