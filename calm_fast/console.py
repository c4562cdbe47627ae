"""What a person sees in the terminal: the one rich progress bar of calm-fast (training and evaluation
alike) and the one-line message for a user's mistake (a bad config key, a missing file), printed to
stderr as `calm-fast COMMAND: message` instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

USAGE_ERROR = 2  # the exit status of a command stopped by a user error


def progress_bar(label: str, *, status: bool = False, transient: bool = False) -> Progress:
    """A rich Progress: `label`, the bar, done/total, then (with `status`) a task's `status` field and the
    time remaining, else the time elapsed. Add tasks with `status=""` when `status` is set."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[status]}"), TimeRemainingColumn()] if status else [TimeElapsedColumn()]
    return Progress(*columns, transient=transient)


def track(iterable: Iterable[T], label: str, enabled: bool = True) -> Iterator[T]:
    """Yield from `iterable` under a transient progress bar (its length as total when it has one)."""
    if not enabled:
        yield from iterable
        return
    total = len(iterable) if hasattr(iterable, "__len__") else None
    with progress_bar(label, transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


def user_error(command: str, error: BaseException | str) -> int:
    """Print `calm-fast COMMAND: error` on one line to stderr; return the usage-error exit status."""
    print(f"calm-fast {command}: {error}", file=sys.stderr)
    return USAGE_ERROR
