"""Forward (input-first) order of the layers of a run, as grad_guard wrote them.

The monitor writes all layers of one step in a single summary event, in forward order,
so the first event that holds a quantity's tags lists its layers input first. TensorBoard's
data providers do not keep that order: the in-process multiplexer returns tags in the
order they were first seen (forward order), but the Rust data server behind
``--load_fast`` (the default where it is installed) returns them in hash order. So the
order is read from the run's own event files when they are on a local disk, scanning
only up to the first events that hold the tags; otherwise the provider's order is kept
(in-process) or the names are sorted naturally (``net.2`` before ``net.10``).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence

MAX_SCANNED_EVENTS = 20_000
"""Most events read from a run's files to learn the order (the first few normally do)."""

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``net.2`` before ``net.10``.

    Example:
        >>> sorted(["net.10", "net.2", "head"], key=natural_key)
        ['head', 'net.2', 'net.10']
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(name) if p)


def run_directory(logdir: str | None, run: str) -> str | None:
    """The local folder of ``run`` under ``logdir``, or ``None`` if it is not on disk.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> run_directory(root, ".") == root
        True
        >>> run_directory(root, "missing") is None
        True
    """
    if not logdir or "://" in logdir:
        return None
    path = os.path.normpath(os.path.join(logdir, run))
    return path if os.path.isdir(path) else None


def event_files(run_dir: str) -> list[str]:
    """The event files directly in ``run_dir`` (not in sub-runs), oldest name first."""
    pattern = os.path.join(glob.escape(run_dir), "*tfevents*")
    return sorted(f for f in glob.glob(pattern) if os.path.isfile(f))


def written_order(run_dir: str, tags: Iterable[str]) -> list[str]:
    """``tags`` in the order the run's event files first hold them.

    Reads events until every tag has been seen (or :data:`MAX_SCANNED_EVENTS`); tags
    never seen come last, in natural order.

    Args:
        run_dir: a folder holding ``events.out.tfevents.*`` files.
        tags: the tags to place.

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> from grad_guard.loggers import write_scalars
        >>> folder = tempfile.mkdtemp()
        >>> writer = SummaryWriter(folder)
        >>> write_scalars(writer, {"grad_norm/stem": 1.0, "grad_norm/a_head": 2.0}, step=0)
        True
        >>> writer.close()
        >>> written_order(folder, ["grad_norm/a_head", "grad_norm/stem"])
        ['grad_norm/stem', 'grad_norm/a_head']
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    wanted = set(tags)
    order: list[str] = []
    seen: set[str] = set()
    scanned = 0
    for path in event_files(run_dir):
        try:
            for event in EventFileLoader(path).Load():
                scanned += 1
                if event.HasField("summary"):
                    for value in event.summary.value:
                        if value.tag in wanted and value.tag not in seen:
                            seen.add(value.tag)
                            order.append(value.tag)
                if len(seen) == len(wanted) or scanned >= MAX_SCANNED_EVENTS:
                    break
        except Exception:  # a truncated or unreadable file: use what was read
            pass
        if len(seen) == len(wanted) or scanned >= MAX_SCANNED_EVENTS:
            break
    return order + sorted(wanted - seen, key=natural_key)


def forward_order(tags: Sequence[str], run_dir: str | None, provider_ordered: bool) -> list[str]:
    """Order ``tags`` input layer first.

    Args:
        tags: the tags of one quantity as the data provider listed them.
        run_dir: the run's local folder (``None`` when not on a local disk).
        provider_ordered: whether the provider lists tags in first-written order (the
            in-process multiplexer does; the Rust data server does not).

    Example:
        >>> forward_order(["net.10", "net.2"], None, provider_ordered=False)
        ['net.2', 'net.10']
        >>> forward_order(["net.10", "net.2"], None, provider_ordered=True)
        ['net.10', 'net.2']
    """
    if run_dir is not None and event_files(run_dir):
        return written_order(run_dir, tags)
    if provider_ordered:
        return list(tags)
    return sorted(tags, key=natural_key)
