"""What a person sees in the terminal: the one rich progress bar of calm-fast (training and evaluation
alike) and the one-line message for a user's mistake (a bad config key, a missing file), printed to
stderr as `calm-fast COMMAND: message` instead of a traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

USAGE_ERROR = 2  # the exit status of a command stopped by a user error

# torch's DataLoader re-raises a worker's exception with the worker's traceback in the message.
_WRAPPED_TRACEBACK = re.compile(r"Original Traceback \(most recent call last\):")


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
    """Print `calm-fast COMMAND: error` on one line to stderr (`calm-fast COMMAND (rank R): ...` under a
    multi-process launcher); return the usage-error exit status."""
    rank = f" (rank {os.environ.get('RANK', '?')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    line = f"calm-fast {command}{rank}: {one_line(error)}\n"
    # One write call: `print` writes the text and its newline separately, so two ranks sharing a pipe
    # could interleave into one line. A single write of under PIPE_BUF bytes to a pipe is atomic.
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode(sys.stderr.encoding or "utf-8", "backslashreplace"))
    except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest's capture, a StringIO)
        sys.stderr.write(line)
        sys.stderr.flush()
    return USAGE_ERROR


def one_line(error: BaseException | str) -> str:
    """The message of `error` as one line (a DataLoader worker's traceback reduced to its last line)."""
    text = str(error)
    if isinstance(error, BaseException) and _WRAPPED_TRACEBACK.search(text):
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(rf"^([\w.]+\.)?{type(error).__name__}: ", "", last.strip())
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
