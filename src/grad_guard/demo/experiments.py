"""The demo's rows: vanishing and exploding gradients, then their fixes.

=============================  ==========  ==========================================
row                            outcome     what it shows
=============================  ==========  ==========================================
``sigmoid-default``            vanishes    ratio ~1e-16 at step 0, nothing learned
``tanh-xavier``                learns      Xavier keeps tanh gradients alive at depth 20
``relu-he``                    learns      He init + ReLU, depth 10, a moderate step
``relu-he-lr0.1``              diverges    the same at lr 0.1 + momentum 0.9: NaN
``relu-he-lr0.1-clip-norm``    rescued     NormClip(1.0) on the diverging run
``relu-he-lr0.1-autoclip``     rescued     AutoClip (25th percentile)
``relu-he-lr0.1-agc``          rescued     AGC (unit-wise, clip_factor 0.01)
``relu-he-lr0.1-zclip``        stalls      ZClip cuts spikes, not a steady climb
``residual-bn``                learns      residual + BatchNorm, depth 20, lr 0.1
=============================  ==========  ==========================================

Every outcome was checked over seeds 0-4 and with 1 and 2 torch threads (a change of
the floating-point summation order, as another CPU makes): each row shows its outcome
for every seed, and the rows that learn stay within a few accuracy points of each
other. Settings near a tipping point (where rounding decides whether a run blows up)
were left out.

Example:
    >>> rows = default_experiments()
    >>> [row.expected for row in rows][:4]
    ['vanishes', 'learns', 'learns', 'diverges']
"""

from __future__ import annotations

from typing import Any

from grad_guard._validation import check_int
from grad_guard.demo.experiment import Experiment
from grad_guard.demo.settings import BATCH_SIZE, DEFAULT_STEPS

DEEP = 20
"""Depth of the vanishing, tanh and residual rows."""
RELU_DEPTH = 10
"""Depth of the ReLU rows (a plain 20-layer ReLU stack at width 64 trains too slowly for
the demo's few steps)."""
HIGH_LR = 0.1
"""The learning rate (with momentum 0.9) at which the plain ReLU stack diverges."""


def _mlp(activation: str, init: str, depth: int) -> dict[str, Any]:
    return {"depth": depth, "width": 64, "activation": activation, "init": init}


def default_experiments(
    depth: int = DEEP, steps: int = DEFAULT_STEPS, relu_depth: int = RELU_DEPTH
) -> list[Experiment]:
    """The demo's rows, in the order the table shows them.

    Args:
        depth: ``Linear`` layers of the sigmoid, tanh and residual rows.
        steps: training steps of every row.
        relu_depth: ``Linear`` layers of the ReLU rows.

    Raises:
        ValueError: if ``depth`` or ``relu_depth`` is below 2, or ``steps`` below 1.

    Example:
        >>> default_experiments()[4].describe()
        'mlp(depth=10, width=64, activation=relu, init=he) sgd lr=0.1 momentum=0.9 batch=64 clip=norm(max_norm=1.0)'
    """
    check_int("depth", depth, 2)
    check_int("relu_depth", relu_depth, 2)
    check_int("steps", steps)
    common = {"steps": steps, "batch_size": BATCH_SIZE}
    relu = _mlp("relu", "he", relu_depth)
    high = f"relu-he-lr{HIGH_LR}"

    def rescued(suffix: str, algorithm: str, kwargs: dict[str, Any], lesson: str) -> Experiment:
        return Experiment(
            f"{high}-{suffix}",
            "mlp",
            relu,
            lr=HIGH_LR,
            clip_algorithm=algorithm,
            clip_kwargs=kwargs,
            expected="rescued",
            lesson=lesson,
            **common,
        )

    return [
        Experiment(
            "sigmoid-default",
            "mlp",
            _mlp("sigmoid", "default", depth),
            lr=0.1,
            momentum=0.0,
            expected="vanishes",
            lesson=(
                "Sigmoid + PyTorch's default init: each layer multiplies the backward signal "
                "by about 0.14 (sigmoid' <= 0.25 times small weights), so the first layer's "
                "gradient is ~1e-16 of the last one's and the network stays at chance."
            ),
            **common,
        ),
        Experiment(
            "tanh-xavier",
            "mlp",
            _mlp("tanh", "xavier", depth),
            lr=0.1,
            momentum=0.0,
            expected="learns",
            lesson=(
                "Same depth, tanh with Xavier init (gain 5/3): the gradient reaches the first "
                "layer at the same order of magnitude as the last one, and the network learns."
            ),
            **common,
        ),
        Experiment(
            "relu-he",
            "mlp",
            relu,
            lr=0.01,
            momentum=0.9,
            expected="learns",
            lesson=(
                "ReLU with He init keeps the gradient's scale through the layers; with a "
                "moderate step (lr 0.01, momentum 0.9) the plain stack learns."
            ),
            **common,
        ),
        Experiment(
            high,
            "mlp",
            relu,
            lr=HIGH_LR,
            momentum=0.9,
            expected="diverges",
            lesson=(
                f"The same network at lr {HIGH_LR} with momentum 0.9 (ten times the step): "
                "the updates overshoot, the gradient norm climbs by orders of magnitude, and "
                "the loss becomes NaN (or the network dies at chance, its units dead)."
            ),
            **common,
        ),
        rescued(
            "clip-norm",
            "norm",
            {"max_norm": 1.0},
            "Global norm clipping at 1.0 bounds every update: the run that diverged learns.",
        ),
        rescued(
            "autoclip",
            "autoclip",
            {"percentile": 25.0},
            "AutoClip clips at the 25th percentile of the gradient norms seen so far: the "
            "bound adapts to the run, with no threshold to pick by hand.",
        ),
        rescued(
            "agc",
            "agc",
            {"clip_factor": 0.01},
            "AGC clips each unit's gradient to 1% of its weight norm (the output layer is "
            "left alone): no update can move a weight by more than a small fraction.",
        ),
        Experiment(
            f"{high}-zclip",
            "mlp",
            relu,
            lr=HIGH_LR,
            clip_algorithm="zscore",
            clip_kwargs={},
            expected="stalls",
            lesson=(
                "ZClip (default settings) cuts only norms that are outliers (z-score > 2.5) "
                "against an EMA of recent norms, after a 25-step warm-up. Here the norm "
                "climbs steadily rather than in spikes, so its bound climbs with it: the loss "
                "stays finite but the run does not learn. ZClip is made for runs that are "
                "stable apart from rare spikes, not for a learning rate that is too high."
            ),
            **common,
        ),
        Experiment(
            "residual-bn",
            "residual_mlp",
            {"depth": depth, "width": 64, "activation": "relu"},
            lr=HIGH_LR,
            momentum=0.9,
            expected="learns",
            lesson=(
                "Residual connections + BatchNorm, twice the depth, at the learning rate that "
                "made the plain ReLU stack diverge: the identity path carries the gradient, "
                "and the network trains fast and stably."
            ),
            **common,
        ),
    ]
