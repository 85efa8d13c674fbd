"""Progress of the demo: one bar over all runs (rich) or one line per finished run."""

from __future__ import annotations

import sys
from typing import Any

from grad_guard.demo.rows import SeedRun, classify


def console() -> Any:
    """A rich console on stdout (wide when stdout is not a terminal), or ``None`` without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    result = Console(file=sys.stdout)
    if not result.is_terminal:  # a log file or a pipe: no need to wrap the table at 80
        result = Console(file=sys.stdout, width=160)
    return result


def say(target: Any, text: str) -> None:
    """Print ``text`` on a rich console, or with ``print`` when ``target`` is ``None``."""
    if target is None:
        print(text, flush=True)
    else:
        target.print(text, markup=False, highlight=False, soft_wrap=True)


class RunProgress:
    """Counts finished runs; a rich bar when ``console`` is given and ``bar=True``.

    The bar never refreshes on its own (no background thread), so worker processes can
    be forked while it is shown; it redraws when a run finishes.

    Args:
        total: runs to train.
        console: a rich console, or ``None`` for plain lines.
        bar: draw the bar (``False``: only the per-run lines).
        clipped: row name -> whether the row clips (to name each run's outcome).
        enabled: print anything at all.

    Example:
        >>> with RunProgress(1, None, bar=False, clipped={"r": False}, enabled=False) as p:
        ...     p(SeedRun("r", 0, 5, 5, 1.0, 0.97, 0.1, None, {}, None, [], "", 1.0))
        >>> p.done
        1
    """

    def __init__(
        self,
        total: int,
        console: Any,
        bar: bool,
        clipped: dict[str, bool],
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.console = console
        self.clipped = clipped
        self.enabled = enabled
        self.done = 0
        self._progress: Any = None
        self._task: Any = None
        if enabled and bar and console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("runs"),
                console=console,
                auto_refresh=False,
            )
            self._task = self._progress.add_task("training", total=total)

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
            self._progress.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()

    def __call__(self, run: SeedRun) -> None:
        self.done += 1
        if not self.enabled:
            return
        outcome = classify(run, clipped=self.clipped.get(run.name, False))
        line = (
            f"{run.name:<26} seed {run.seed}  accuracy {run.accuracy:6.1%}  {outcome:<8}"
            f"  ({run.wall_time_s:.1f} s)"
        )
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
            self._progress.advance(self._task)
            self._progress.refresh()
        else:
            say(self.console, line)
