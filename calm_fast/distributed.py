"""The distributed world of a run, decided once at start and passed down.

calm-fast runs the same code as one process, under the `deepspeed` launcher (one or many nodes) and under
`torchrun`: launchers export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and a plain
`calm-fast train` sets them for a world of one (on a free local port). The process group is gloo on CPU and
NCCL on CUDA, created through DeepSpeed with a finite timeout, so a collective that waits on a dead rank
fails instead of hanging; `Watchdog` bounds the time between two finished steps for everything else.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import numba
import torch

_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Where this process sits: its ranks, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-compiled ops go: inside the virtualenv, so they are compiled once."""
    return os.path.join(sys.prefix, "torch_extensions")


def prepare_environment() -> None:
    """Environment DeepSpeed reads at import: the extensions folder and a single-process world if no
    launcher set one. Idempotent; call before importing deepspeed."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    present = [name for name in _LAUNCHER_VARIABLES if name in os.environ]
    if not present:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    elif len(present) != len(_LAUNCHER_VARIABLES):
        missing = sorted(set(_LAUNCHER_VARIABLES) - set(present))
        raise RuntimeError(f"incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} "
                           "missing; run under deepspeed/torchrun, or unset them all for one process")


def free_port() -> int:
    """A TCP port that is free on this machine right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_world(timeout_minutes: float = 10.0) -> World:
    """Create the process group (through DeepSpeed) and return this process's World."""
    prepare_environment()
    import deepspeed  # after prepare_environment: DeepSpeed reads the environment when imported

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # DeepSpeed picks the backend of its accelerator (NCCL on CUDA, gloo on CPU).
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes), auto_mpi_discovery=False,
                               verbose=False)
    return World(rank=rank, local_rank=local_rank, world_size=world_size, local_world_size=local_world_size,
                 device=device)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def in_multi_rank_job() -> bool:
    """True when a launcher started this process as one of several ranks (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def report_rank_failure(command: str, error: BaseException) -> int:
    """The one handler of a rank that fails in a multi-rank job; returns the exit status (1).

    The launcher stops the other ranks when one exits non-zero, so this prints the traceback and one line
    that names the rank and the error: a collective error is often only the echo of another rank's death.
    """
    traceback.print_exc()
    print(f"[calm-fast] {command} rank {os.environ.get('RANK', '?')} failed: {type(error).__name__}: {error}. If "
          "this is a communication error, another rank probably died first: look for its message above.",
          file=sys.stderr, flush=True)
    return 1


def share_cpu_threads(world: World) -> None:
    """Ranks on one machine share its cores: torch's (on CPU) and numba's (the box metrics) threads alike.
    An explicit OMP_NUM_THREADS wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // world.local_world_size)
    if world.device.type == "cpu":
        torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def shutdown_world() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor (a no-op in a world of one).

    NCCL has no CPU path, so under NCCL a CPU tensor makes the round trip through this rank's GPU; callers
    keep their small bookkeeping tensors (counts, losses, metric state) wherever is convenient.
    """
    return _all_reduce(tensor, "SUM")


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks, in place, as all_reduce_sum sums."""
    return _all_reduce(tensor, "MIN")


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    dist = torch.distributed
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=getattr(dist.ReduceOp, op))
        tensor.copy_(on_device)
    else:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (a collective: call it on all ranks)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


class Watchdog:
    """Stops this process with a clear message when no step finishes for `timeout_s` seconds.

    Collectives already time out (dist.timeout_minutes), but a rank can also hang outside them (a stuck
    loader worker, a dead file system). The main loop calls `beat()` after every step; a daemon thread
    checks the age of the last beat and, past the limit, prints every thread's stack and exits with
    status 3, which makes the launcher stop the other ranks.
    """

    def __init__(self, timeout_s: float, rank: int, poll_s: float | None = None):
        self.timeout_s = timeout_s
        self.rank = rank
        self._poll_s = poll_s if poll_s is not None else min(10.0, timeout_s / 4)
        self._last_beat = time.monotonic()
        self._what = "start-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calm-fast-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self, what: str) -> None:
        self._last_beat = time.monotonic()
        self._what = what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            idle = time.monotonic() - self._last_beat
            if idle > self.timeout_s:
                print(f"[calm-fast] rank {self.rank}: no progress for {idle:.0f} s after {self._what} "
                      f"(limit dist.watchdog_minutes = {self.timeout_s / 60:g}); another rank may have died "
                      "or hung. Stacks follow; stopping.", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr)
                sys.stderr.flush()
                os._exit(3)
