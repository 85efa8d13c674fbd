"""Defaults and file names of ``grad-guard demo`` (no heavy imports: ``--help`` reads them)."""

from __future__ import annotations

DEFAULT_OUT = "grad_guard_demo"
"""Default output folder."""
DEFAULT_STEPS = 150
"""Optimizer steps of every run of the full demo."""
QUICK_STEPS = 40
"""Optimizer steps of every run with ``--quick``."""
DEFAULT_SEEDS = 3
"""Seeds every row is trained with (``0 .. n-1``); the table reports their mean and spread."""
QUICK_SEEDS = 1
"""Seeds per row with ``--quick``."""
BATCH_SIZE = 64
"""Digits per step of every row."""
LOGGED_POINTS = 30
"""About how many logged steps each run records (``log_every_n_steps = steps // 30``)."""
IMAGE_EVERY = 15
"""Logged steps between two TensorBoard heatmap / flow images of a showcase run."""

LEARNED_ACCURACY = 0.9
"""A run that ends at or above this accuracy on the digits "learns"."""
VANISHING_RATIO = 1e-6
"""A run whose first layer gets less than this fraction of the last layer's gradient at
step 0 and does not learn "vanishes"."""
BLOWN_UP_LOSS = 10.0
"""A final loss above this (chance is ln 10 = 2.3) counts as "diverges" even if finite."""
BLOWN_UP_GRADIENT = 100.0
"""A run that does not learn and whose gradient norm grew more than this many times its
first value counts as "diverges" (it exploded, then died at chance) even without a NaN."""
SPREAD_POINTS = 4.0
"""Most accuracy points (max - min over seeds) a row that learns may spread (the committed
results are tested against it)."""

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
FIGURE_NAME = "gradient_flow_comparison.png"
RESULTS_FORMAT = "grad_guard_demo/2"
WALL_CLOCK_KEYS = frozenset({"wall_time_s", "cpu_time_s", "timing"})
"""Keys of ``results.json`` that hold measured times: the only values two runs of the
demo on one machine may disagree on."""

REQUIRED = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
"""Import name -> pip name of the packages the demo cannot run without."""
