"""FFCV's DatasetWriter run in a process of its own, so that no fault leaves a hung or orphaned conversion.

`run_writer` forks a conversion process that runs the writer (and forks FFCV's workers) and waits for it.
- A worker that dies without a word (killed for memory, a native crash) is found by a `_CrashWatch` in the
  conversion process, which then stops; the caller gets the reason within about a second. The writer runs
  away from the caller because its work queue can hold more than its pipe takes: after a worker's death a
  process that exits blocks forever on the queue's feeder thread. The conversion process leaves with
  os._exit, which waits for no thread.
- Every process dies with its parent (Linux's PR_SET_PDEATHSIG): killing the caller, even with SIGKILL,
  takes the conversion process and all its workers down with it, shared memory segments and all.
- If the caller stops waiting (Ctrl-C), it kills the conversion process, and the workers follow it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["WriterStopped", "die_with_parent", "run_writer"]

_PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


class WriterStopped(RuntimeError):
    """The conversion process stopped before the writer finished; the message says why."""


def run_writer(writer, source, chunk_size: int, worker_registry: Path, stop_file: Path) -> None:
    """``writer.from_indexed_dataset(source, chunksize=chunk_size)`` in a forked conversion process.

    FFCV's workers register their pid in ``worker_registry`` (``source`` does that on its first item);
    ``stop_file`` receives the reason the conversion process stopped, if it does. Raises
    :class:`WriterStopped` with that reason, or with the signal that killed the conversion process."""
    child = multiprocessing.get_context("fork").Process(
        target=_conversion_process, args=(writer, source, chunk_size, worker_registry, stop_file, os.getpid()),
        name="calm-fast-convert")
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():  # we were interrupted: the workers die with their parent
            child.kill()
            child.join()
    if child.exitcode == 0:
        return
    if stop_file.is_file():
        raise WriterStopped(stop_file.read_text(encoding="utf-8").strip())
    if child.exitcode < 0:
        raise WriterStopped(f"the conversion process (pid {child.pid}) was killed by "
                            f"{signal.Signals(-child.exitcode).name}")
    raise WriterStopped(f"the conversion process (pid {child.pid}) died with exit code {child.exitcode}")


def die_with_parent(parent_pid: int) -> None:
    """Have Linux kill this process (SIGKILL) as soon as its parent dies; exit now if it already has.
    Elsewhere a no-op (the orphan protection is Linux-only)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def _conversion_process(writer, source, chunk_size: int, worker_registry: Path, stop_file: Path,
                        parent_pid: int) -> None:
    die_with_parent(parent_pid)
    conversion_pid = os.getpid()
    # Runs in every worker FFCV forks from here, before the worker does anything else.
    multiprocessing.util.register_after_fork(source, lambda _source: die_with_parent(conversion_pid))
    code = 0
    try:
        with _CrashWatch(worker_registry) as watch:
            try:
                writer.from_indexed_dataset(source, chunksize=chunk_size)
            except _WorkerCrashed as crash:
                watch.acknowledge()
                _release_shared_memory(writer)
                stop_file.write_text(str(crash), encoding="utf-8")
                code = 3
    except BaseException as error:  # KeyboardInterrupt included; the caller reports it
        stop_file.write_text(f"{type(error).__name__}: {error}", encoding="utf-8")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the workers still running get SIGKILL: their parent is gone


def _release_shared_memory(writer) -> None:
    """DatasetWriter unlinks its shared metadata block only when it finishes; do it after a stop."""
    block = getattr(writer, "metadata_sm", None)
    if hasattr(block, "unlink"):
        block.close()
        block.unlink()


class _WorkerCrashed(Exception):
    """Raised in the main thread by :class:`_CrashWatch`."""


class _CrashWatch(threading.Thread):
    """Stops a conversion whose worker process died without a word (killed for memory, a native crash).

    FFCV's DatasetWriter polls its workers' progress counter until every sample is done, with no timeout,
    so a dead worker would hang it forever. Workers register their pid in ``registry`` on their first
    image; the watch peeks at their exit status without reaping them (``waitid`` with ``WNOWAIT``, so
    multiprocessing still can). On a death it signals the main thread (SIGUSR1) every 0.1 s until the
    main thread calls :meth:`acknowledge`; the handler raises :class:`_WorkerCrashed` out of the writer,
    again only if 2 s pass unacknowledged (an exception may land where Python swallows it, in a
    finaliser say). Signals need the main thread: elsewhere ``armed`` is False and nothing is watched.
    """

    def __init__(self, registry: Path):
        super().__init__(daemon=True)
        self.registry = registry
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(os, "waitid")
        self.crash: str | None = None
        self._stopped = threading.Event()
        self._previous_handler = None
        self._acknowledged = False
        self._raised_at: float | None = None

    def __enter__(self) -> "_CrashWatch":
        if self.armed:
            self._previous_handler = signal.signal(signal.SIGUSR1, self._on_signal)
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        if self.armed:
            self.join()  # every signal it sent has reached the handler by now
            signal.signal(signal.SIGUSR1, self._previous_handler)

    def _on_signal(self, signum, frame) -> None:
        if self.crash is None or self._acknowledged or self._stopped.is_set():
            return
        if self._raised_at is None or time.monotonic() - self._raised_at > 2.0:
            self._raised_at = time.monotonic()
            raise _WorkerCrashed(self.crash)

    def acknowledge(self) -> None:
        """The main thread caught :class:`_WorkerCrashed`: stop raising it."""
        self._acknowledged = True

    def run(self) -> None:
        while not self._stopped.wait(0.1):
            if self.crash is None:
                self.crash = self._find_dead_worker()
            if self.crash is not None and not self._acknowledged:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def _find_dead_worker(self) -> str | None:
        for pid in (int(name) for name in os.listdir(self.registry)):
            try:
                status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue  # already reaped by multiprocessing: its exit code is not ours to see
            if status is None or (status.si_code == os.CLD_EXITED and status.si_status == 0):
                continue
            if status.si_code == os.CLD_EXITED:
                return f"a conversion worker (pid {pid}) died with exit code {status.si_status}"
            return f"a conversion worker (pid {pid}) was killed by {signal.Signals(status.si_status).name}"
        return None
