"""The demo's results: :class:`SeedRun` (one row, one seed) and :class:`DemoRow` (all seeds).

A row is trained once per seed; :func:`classify` names the outcome of each run, and a
row's lesson holds when every seed shows the outcome the row expects. The accuracy is
reported as the mean over seeds and its spread (max - min, in points).

Example:
    >>> run = SeedRun("r", 0, 5, 5, 1.0, 0.97, 0.1, None, {}, None, [], "r/seed_0", 1.0)
    >>> classify(run, clipped=False)
    'learns'
    >>> row = DemoRow("r", "", "", "learns", None, [run])
    >>> row.robust, row.accuracy_mean
    (True, 0.97)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from grad_guard.demo.settings import (
    BLOWN_UP_GRADIENT,
    BLOWN_UP_LOSS,
    LEARNED_ACCURACY,
    VANISHING_RATIO,
)


@dataclass
class SeedRun:
    """What one run (one row, one seed) measured.

    Attributes:
        name: the row's name.
        seed: seed of weights and batch order.
        steps: steps asked for.
        steps_run: steps run (fewer when a diverged run was stopped).
        grad_ratio: first/last weight-layer gradient-norm ratio at step 0.
        accuracy: accuracy on the whole digits set after training.
        final_loss: cross-entropy on the whole set after training (``nan`` if diverged).
        diverged_at: first step whose loss was NaN/Inf, ``None`` if none.
        counts: GradGuard's detection counts (``vanishing``, ``exploding``, ...).
        clipped_fraction: fraction of the steps the clipper clipped, ``None`` without one.
        rules: the end-of-fit report's diagnosis rules that fired.
        log_dir: the run's TensorBoard directory, relative to the demo's output folder.
        wall_time_s: seconds spent training (measured; differs run to run).
        outcome: :func:`classify`'s verdict (filled in by :meth:`DemoRow.__post_init__`).
        first_grad_norm: the raw total gradient norm of the first step.
        max_grad_norm: the largest finite raw total gradient norm of the run.
        cpu_time_s: CPU seconds of the whole run, setup and report included (measured).
        step0_norms: gradient norm per weight layer at step 0, input first.
        median_norms: median over the logged steps of each weight layer's gradient norm.
        total_norms: the raw total gradient norm of every step.
    """

    name: str
    seed: int
    steps: int
    steps_run: int
    grad_ratio: float
    accuracy: float
    final_loss: float
    diverged_at: int | None
    counts: dict[str, int]
    clipped_fraction: float | None
    rules: list[str]
    log_dir: str
    wall_time_s: float
    outcome: str = ""
    first_grad_norm: float = math.nan
    max_grad_norm: float = math.nan
    cpu_time_s: float = 0.0
    step0_norms: list[float] = field(default_factory=list, repr=False)
    median_norms: list[float] = field(default_factory=list, repr=False)
    total_norms: list[float] = field(default_factory=list, repr=False)

    @property
    def problems(self) -> list[str]:
        """The gradient problems GradGuard flagged: detection counts or a report rule."""
        found = []
        if self.counts.get("vanishing", 0) or any(r.startswith("vanishing") for r in self.rules):
            found.append("vanishing")
        if self.counts.get("exploding", 0) or "exploding" in self.rules:
            found.append("exploding")
        if self.counts.get("nonfinite", 0) or "nonfinite" in self.rules:
            found.append("non-finite")
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SeedRun:
        """Rebuild a run from :meth:`to_dict`'s output (``None`` floats become ``nan``)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("grad_ratio", "accuracy", "final_loss", "first_grad_norm", "max_grad_norm"):
            values[key] = math.nan if values.get(key) is None else float(values[key])
        for key in ("step0_norms", "median_norms", "total_norms"):
            values[key] = [math.nan if v is None else float(v) for v in values.get(key, [])]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe values (non-finite floats become ``None``)."""
        data = asdict(self)
        data["problems"] = self.problems
        return json_safe(data)


def classify(run: SeedRun, clipped: bool) -> str:
    """The outcome of one run, one of :data:`~grad_guard.demo.experiment.OUTCOMES`.

    ``diverges``: the loss became NaN/Inf, or ended above
    :data:`~grad_guard.demo.settings.BLOWN_UP_LOSS`, or the run did not learn and its
    gradient norm grew more than :data:`~grad_guard.demo.settings.BLOWN_UP_GRADIENT` times
    its first value (the gradient exploded and the network died). ``learns`` (``rescued`` for a
    clipped run): accuracy >= :data:`~grad_guard.demo.settings.LEARNED_ACCURACY`.
    ``vanishes``: the first layer got less than
    :data:`~grad_guard.demo.settings.VANISHING_RATIO` of the last layer's gradient at
    step 0 and the run did not learn. ``stalls``: anything else.

    Example:
        >>> run = SeedRun("r", 0, 5, 5, 1e-16, 0.1, 2.3, None, {}, None, [], "", 1.0)
        >>> classify(run, clipped=False)
        'vanishes'
    """
    loss = run.final_loss
    if run.diverged_at is not None or not math.isfinite(loss) or loss > BLOWN_UP_LOSS:
        return "diverges"
    if run.accuracy >= LEARNED_ACCURACY:
        return "rescued" if clipped else "learns"
    if run.max_grad_norm > BLOWN_UP_GRADIENT * run.first_grad_norm:
        return "diverges"
    if run.grad_ratio < VANISHING_RATIO:
        return "vanishes"
    return "stalls"


@dataclass
class DemoRow:
    """One row of the demo: a configuration and its runs, one per seed.

    Attributes:
        name: the experiment's name (its TensorBoard run folder).
        description: model, optimizer and clipping in one line.
        lesson: what the row teaches.
        expected: the outcome every seed should show.
        clip_algorithm: the clipper's shortcut name, ``None`` without clipping.
        runs: one :class:`SeedRun` per seed, in seed order.
    """

    name: str
    description: str
    lesson: str
    expected: str
    clip_algorithm: str | None
    runs: list[SeedRun]

    def __post_init__(self) -> None:
        for run in self.runs:
            run.outcome = classify(run, clipped=self.clip_algorithm is not None)

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    @property
    def outcomes(self) -> Counter[str]:
        """How many seeds showed each outcome."""
        return Counter(run.outcome for run in self.runs)

    @property
    def robust(self) -> bool:
        """Whether every seed showed the expected outcome."""
        return all(run.outcome == self.expected for run in self.runs)

    @property
    def accuracy_mean(self) -> float:
        return sum(run.accuracy for run in self.runs) / len(self.runs)

    @property
    def accuracy_spread(self) -> float:
        """max - min of the accuracy over seeds, in points (0-100 scale)."""
        accuracies = [run.accuracy for run in self.runs]
        return 100.0 * (max(accuracies) - min(accuracies))

    @property
    def grad_ratio(self) -> float:
        """Geometric mean of the step-0 ratios over seeds (they span orders of magnitude)."""
        ratios = [run.grad_ratio for run in self.runs if run.grad_ratio > 0]
        if not ratios:
            return math.nan
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    @property
    def diverged_at(self) -> list[int | None]:
        return [run.diverged_at for run in self.runs]

    @property
    def clipped_fraction(self) -> float | None:
        values = [r.clipped_fraction for r in self.runs if r.clipped_fraction is not None]
        return sum(values) / len(values) if values else None

    @property
    def problems(self) -> list[str]:
        """Problems GradGuard flagged in at least one seed."""
        return sorted({problem for run in self.runs for problem in run.problems})

    @property
    def rules(self) -> Counter[str]:
        """How many seeds' reports fired each diagnosis rule."""
        return Counter(rule for run in self.runs for rule in run.rules)

    @property
    def wall_time_s(self) -> float:
        """Mean seconds of training per seed (measured)."""
        return sum(run.wall_time_s for run in self.runs) / len(self.runs)

    @property
    def cpu_time_s(self) -> float:
        """CPU seconds of all seeds' runs together (measured)."""
        return sum(run.cpu_time_s for run in self.runs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoRow:
        """Rebuild a row from :meth:`to_dict`'s output."""
        runs = [SeedRun.from_dict(run) for run in data["runs"]]
        keys = ("name", "description", "lesson", "expected", "clip_algorithm")
        return cls(**{key: data[key] for key in keys}, runs=runs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe values: the fields, the summary and every seed's run."""
        return json_safe(
            {
                "name": self.name,
                "description": self.description,
                "lesson": self.lesson,
                "expected": self.expected,
                "clip_algorithm": self.clip_algorithm,
                "robust": self.robust,
                "outcomes": dict(sorted(self.outcomes.items())),
                "accuracy_mean": self.accuracy_mean,
                "accuracy_spread_points": self.accuracy_spread,
                "runs": [run.to_dict() for run in self.runs],
            }
        )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN).

    Example:
        >>> json_safe({"a": [1.0, float("nan")]})
        {'a': [1.0, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
