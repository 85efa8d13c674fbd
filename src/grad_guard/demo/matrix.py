"""Run the demo's rows over several seeds, in this process or in worker processes.

Every (row, seed) run is independent, single-threaded and seeded, so the numbers are
the same whether the runs train one after the other (``jobs=1``) or side by side in
``jobs`` worker processes; only the measured times differ.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

from grad_guard._validation import check_int
from grad_guard.demo.experiment import Experiment
from grad_guard.demo.rows import DemoRow, SeedRun
from grad_guard.demo.settings import DEFAULT_SEEDS, DEFAULT_STEPS

Report = Callable[[SeedRun], None]
"""Called with each finished run (in the order runs finish)."""


def default_jobs() -> int:
    """Worker processes for the demo: the usable cores, at most 4 (at least 1).

    Example:
        >>> 1 <= default_jobs() <= 4
        True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def run_demo(
    out: str,
    steps: int = DEFAULT_STEPS,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    experiments: Sequence[Experiment] | None = None,
    jobs: int = 1,
    on_run: Report | None = None,
) -> list[DemoRow]:
    """Train every row for every seed with GradGuard attached; one :class:`DemoRow` per row.

    Args:
        out: TensorBoard root; each run goes to ``out/<row>/seed_<seed>``.
        steps: optimizer steps per run (>= 1).
        seeds: how many seeds (``0 .. n-1``), or the seeds themselves.
        experiments: the rows; default :func:`~grad_guard.demo.experiments.default_experiments`.
        jobs: runs trained side by side in worker processes (1: in this process).
        on_run: called with each finished :class:`SeedRun` (progress reporting).

    Raises:
        ValueError: if ``steps``, ``seeds`` or ``jobs`` is out of range.

    Example:
        >>> import tempfile
        >>> from grad_guard.demo.experiments import default_experiments
        >>> rows = default_experiments(depth=3, steps=2)[:1]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [(row.name, row.seeds) for row in run_demo(tmp, 2, [0, 1], rows)]
        [('sigmoid-default', [0, 1])]
    """
    check_int("steps", steps)
    check_int("jobs", jobs)
    seed_list = _seeds(seeds)
    if experiments is None:
        from grad_guard.demo.experiments import default_experiments

        experiments = default_experiments()
    out = os.path.abspath(out)
    tasks = [(exp, seed) for exp in experiments for seed in seed_list]
    showcase = seed_list[0]
    done: dict[tuple[str, int], SeedRun] = {}

    def finished(run: SeedRun) -> None:
        done[(run.name, run.seed)] = run
        if on_run is not None:
            on_run(run)

    if jobs == 1 or len(tasks) == 1:
        from grad_guard.demo.seedrun import train_seed

        for exp, seed in tasks:
            finished(train_seed(exp, out, seed, steps, seed == showcase))
    else:
        _run_in_workers(tasks, out, steps, showcase, jobs, finished)
    return [
        DemoRow(
            name=exp.name,
            description=exp.describe(),
            lesson=exp.lesson,
            expected=exp.expected,
            clip_algorithm=exp.clip_algorithm,
            runs=[done[(exp.name, seed)] for seed in seed_list],
        )
        for exp in experiments
    ]


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        check_int("seeds", seeds)
        return list(range(seeds))
    values = list(seeds)
    if (
        not values
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values)
        or len(set(values)) != len(values)
    ):
        raise ValueError(f"`seeds` must be an int >= 1 or distinct ints >= 0, got {seeds!r}")
    return values


def _run_in_workers(
    tasks: list[tuple[Experiment, int]],
    out: str,
    steps: int,
    showcase: int,
    jobs: int,
    finished: Callable[[SeedRun], None],
) -> None:
    # fork starts a worker in milliseconds; the pool forks all its workers on the first
    # submit, before its own manager thread starts, and the parent has trained nothing
    # (no torch thread pool, no TensorBoard writer thread) to copy. Spawn re-imports
    # torch in every worker where fork is missing.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    from grad_guard.demo import seedrun

    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        futures: list[Future[Any]] = [
            pool.submit(seedrun.train_seed, exp, out, seed, steps, seed == showcase)
            for exp, seed in tasks
        ]
        for future in as_completed(futures):
            finished(future.result())
