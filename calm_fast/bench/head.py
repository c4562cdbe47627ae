"""Fused CALM training loss against the naive PyTorch oracle and torch.compile of it: time, bandwidth, memory.

On a GPU (the default when one is visible) this first runs the on-device checks of `head_checks` (values
and gradients against the oracle; determinism, no host sync, launches, CUDA graphs, torch.compile, opcheck),
then times one training step of the loss, forward + backward (the EM loss by default), at the paper's
shapes (B = 64 and 256, K = 200 and 1000, 28x28, bf16), in both layouts of S: contiguous (cells
contiguous) and channels-last (classes contiguous, what training produces). Paths:

    fused            calm_fast.kernels.calm_loss on S and a (head.calm_loss, backend "triton")
    fused merged     the same op on the merged class + location maps of the model's one conv (channels-last;
                     the training path: head.merged_loss)
    fused ro         fused merged under torch.compile(mode="reduce-overhead", fullgraph=True): CUDA graphs
    oracle           the naive oracle: head.calm_loss in eager PyTorch (backend "torch")
    compile          torch.compile of the oracle (Inductor, default mode)
    compile ro       torch.compile of the oracle, mode="reduce-overhead" (CUDA graphs)

Each path is measured `--repeats` times (>= 3; the median and the spread min-max are reported), each
repeat over `--rep` steps: wall time per step (CUDA events, L2 flushed before each step, median), host time
per step (the CPU time to issue a step while the GPU is held busy, so the CPU never waits) and device time
per step (the sum of the step's kernel times from torch.profiler, L2 flushed before each step, the flush's
own kernels left out). % of peak = the minimum bytes (read S forward; read S and write dS backward:
3·B·K·N·e) over the device time, against the card's peak DRAM bandwidth. Peak memory is what a step
allocates beyond its inputs. `--device cpu` is a smoke mode on tiny shapes under the Triton interpreter
(TRITON_INTERPRET=1 must be set at start): host = wall, no device time; its times say nothing about speed.
Exit status 1 when a check fails.

    python -m calm_fast.cli bench head --out runs/bench/head.json
    TRITON_INTERPRET=1 python -m calm_fast.cli bench head --device cpu --out runs/bench/head-smoke.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from dataclasses import dataclass

import torch

from calm_fast import head
from calm_fast.atomic import write_json
from calm_fast.bench.head_checks import merge_maps, run_checks
from calm_fast.modes import Objective, Precision, Prior

PAPER_SHAPES = ("64x200x28x28", "64x1000x28x28", "256x200x28x28", "256x1000x28x28")
SMOKE_SHAPES = ("2x10x3x5",)
LAYOUTS = ("contiguous", "channels_last")
# Peak DRAM bandwidth in GB/s of cards by name (vendor data sheets); --peak-gbs overrides.
PEAK_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM, "NVIDIA H100 80GB HBM3"
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,  # 40 GB
    "L40S": 864.0,
    "RTX 4090": 1008.0,
}
# The GPU targets (issue 13), judged per shape and layout on the "fused" and "fused merged" rows
TARGETS = {"fraction_of_peak": 0.67, "fraction_of_peak_64x200": 0.45, "host_ms": 0.25, "speedup_vs_compile": 2.0,
           "speedup_vs_oracle": 8.0, "peak_extra_in_logits": 1.0}
FUSED_PATHS = ("fused", "fused merged", "fused ro")


@dataclass(frozen=True)
class Shape:
    batch: int
    classes: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        try:
            values = [int(part) for part in text.lower().split("x")]
            if len(values) != 4 or min(values) < 1:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes {text!r}: expected BxKxHxW with positive integers") from None
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.batch}x{self.classes}x{self.height}x{self.width}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda when available (auto); cpu = interpreter smoke mode with tiny shapes")
    parser.add_argument("--shapes", nargs="+", type=Shape.parse, default=None, metavar="BxKxHxW",
                        help=f"benchmark shapes (default: {' '.join(PAPER_SHAPES)} on GPU, "
                             f"{' '.join(SMOKE_SHAPES)} on cpu)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS), help="memory layouts of S")
    parser.add_argument("--dtype", choices=tuple(Precision), default=Precision.BF16,
                        help="input precision of S and a (as train.precision names it)")
    parser.add_argument("--prior", choices=tuple(Prior), default=Prior.RELU)
    parser.add_argument("--objective", choices=(Objective.EM, Objective.ML), default=Objective.EM,
                        help="the loss timed fwd+bwd (the fused kernel's objectives: CALM-EM's and CALM-ML's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the torch.compile paths (default: on GPU only)")
    parser.add_argument("--rep", type=int, default=None, help="steps per repeat (default 20 on GPU, 2 on cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per path (default 5 on GPU, 3 on cpu)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the card's peak DRAM bandwidth in GB/s (default: looked up by device name)")
    parser.add_argument("--configs", nargs="*", default=(), metavar="BNxBKxWARPS",
                        help="also time the fused merged step with these blocks, e.g. 16x128x4 32x64x8")
    parser.add_argument("--skip-checks", action="store_true", help="only time, skip the correctness checks")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def _resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench head: --device cuda but no CUDA device is visible")
    if choice == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton decides at its import (torchvision imports it, so before any argument is read) whether its
        # own @jit functions run interpreted
        raise SystemExit("bench head --device cpu runs the kernels in the Triton interpreter: start it with "
                         "TRITON_INTERPRET=1 in the environment, e.g. TRITON_INTERPRET=1 calm-fast bench head "
                         "--device cpu")
    return torch.device(choice)


# ----------------------------------------------------------------------------------------------------------
# Measuring


def _spread(values: list[float | None]) -> dict | None:
    if any(value is None for value in values):
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _flush(l2_flush: torch.Tensor) -> None:
    """Evict the L2 with a kernel no measured path runs (bitwise_not), so the profiler can leave it out."""
    torch.bitwise_not(l2_flush, out=l2_flush)


def _device_ms(step, rep: int, l2_flush: torch.Tensor) -> float | None:
    """Sum of the kernel times of one step (L2 flushed before each, the flush's kernels left out)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(rep):
            _flush(l2_flush)
            step()
        torch.cuda.synchronize()
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(event.device_time_total for event in kernels if "bitwise_not" not in event.name)
    return total / rep / 1e3 if total else None  # None: the profiler saw no kernel (e.g. inside a graph)


def _cuda_repeat(step, rep: int, l2_flush: torch.Tensor) -> tuple[float, float, float | None]:
    walls = []
    for _ in range(rep):
        _flush(l2_flush)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        walls.append(start.elapsed_time(end))
    torch.cuda._sleep(100_000_000)  # ~50 ms of GPU work queued first: issuing the steps never waits for it
    begin = time.perf_counter()
    for _ in range(rep):
        step()
    host = (time.perf_counter() - begin) / rep * 1e3
    torch.cuda.synchronize()
    return statistics.median(walls), host, _device_ms(step, rep, l2_flush)


def measure(step, device: torch.device, rep: int, repeats: int, l2_flush: torch.Tensor | None) -> dict:
    """{"wall_ms", "host_ms", "device_ms"}: each the median and min-max over `repeats` repeats."""
    for _ in range(3 if device.type == "cuda" else 1):
        step()
    results = []
    for _ in range(repeats):
        if device.type == "cuda":
            results.append(_cuda_repeat(step, rep, l2_flush))
        else:
            times = []
            for _ in range(rep):
                begin = time.perf_counter()
                step()
                times.append((time.perf_counter() - begin) * 1e3)
            results.append((statistics.median(times), statistics.median(times), None))
    wall, host, device_time = zip(*results)
    return {"wall_ms": _spread(list(wall)), "host_ms": _spread(list(host)), "device_ms": _spread(list(device_time))}


def _peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Bytes allocated at the peak of one fn() beyond what was allocated before (its outputs included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outputs = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del outputs
    return peak


def _peak_bandwidth_gbs(device: torch.device, override: float | None) -> float | None:
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH_GBS.items():  # most specific keys first
        if key in name:
            return value
    return None


# ----------------------------------------------------------------------------------------------------------
# The paths


def _grad_step(loss_fn, inputs, mark_step: bool = False):
    if mark_step:  # CUDA-graph trees: a new step, the previous step's outputs are no longer read
        torch.compiler.cudagraph_mark_step_begin()
    loss = loss_fn(*inputs)
    return torch.autograd.grad(loss, inputs)


def _steps(shape: Shape, layout: str, args, device: torch.device) -> tuple[dict, torch.Tensor]:
    """{path: a fwd+bwd step} for one shape and layout, and S (for its size)."""
    dtype = Precision(args.dtype).dtype
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(shape.batch, shape.classes, shape.height, shape.width, generator=g, device=device, dtype=dtype)
    a = torch.randn(shape.batch, 1, shape.height, shape.width, generator=g, device=device, dtype=dtype)
    labels = torch.randint(0, shape.classes, (shape.batch,), generator=g, device=device)
    if layout == "channels_last":
        s, a = s.contiguous(memory_format=torch.channels_last), a.contiguous(memory_format=torch.channels_last)
    merged = merge_maps(s, a).requires_grad_()
    s, a = s.requires_grad_(), a.requires_grad_()
    loss = functools.partial(head.calm_loss, labels=labels, objective=args.objective, prior=args.prior)
    fused_loss = functools.partial(loss, backend="triton")
    oracle_loss = functools.partial(loss, backend="torch")

    def merged_loss(maps, blocks=None):
        if blocks is None:
            return head.merged_loss(maps, labels, shape.classes, args.objective, args.prior, backend="triton")
        from calm_fast.kernels.calm_loss import calm_loss  # lazy: Triton picks CPU/GPU at import

        return calm_loss(maps, labels, shape.classes, args.prior, args.objective, **blocks)

    steps = {"fused": functools.partial(_grad_step, fused_loss, (s, a))}
    if layout == "channels_last":
        steps["fused merged"] = functools.partial(_grad_step, merged_loss, (merged,))
        if args.compile and device.type == "cuda":
            compiled = torch.compile(merged_loss, mode="reduce-overhead", fullgraph=True, dynamic=False)
            steps["fused ro"] = functools.partial(_grad_step, compiled, (merged,), True)
    steps["oracle"] = functools.partial(_grad_step, oracle_loss, (s, a))
    if args.compile:
        steps["compile"] = functools.partial(_grad_step, torch.compile(oracle_loss, dynamic=False), (s, a))
        if device.type == "cuda":
            compiled = torch.compile(oracle_loss, mode="reduce-overhead", dynamic=False)
            steps["compile ro"] = functools.partial(_grad_step, compiled, (s, a), True)
    for text in args.configs if layout == "channels_last" else ():
        try:
            block_n, block_k, num_warps = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--configs {text!r}: expected BNxBKxWARPS, e.g. 16x128x4") from None
        blocks = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps}
        steps[f"fused merged {text}"] = functools.partial(
            _grad_step, functools.partial(merged_loss, blocks=blocks), (merged,))
    return steps, s


def _bench(shape: Shape, layout: str, args, device, rep, repeats, l2_flush, peak_gbs) -> list[dict]:
    steps, s = _steps(shape, layout, args, device)
    logits_bytes = s.numel() * s.element_size()
    minimum_bytes = 3 * logits_bytes  # read S forward; read S and write dS backward
    vector_allowance = 16 * shape.batch * (shape.classes + shape.height * shape.width)
    rows = []
    for path, step in steps.items():
        row = {"shape": str(shape), "batch": shape.batch, "classes": shape.classes, "height": shape.height,
               "width": shape.width, "layout": layout, "path": path, "dtype": args.dtype,
               "minimum_bytes": minimum_bytes, **measure(step, device, rep, repeats, l2_flush)}
        peak = _peak_extra_bytes(step, device)
        row["peak_extra_bytes"], row["peak_extra_in_logits"] = peak, None if peak is None else peak / logits_bytes
        device_ms = (row["device_ms"] or {}).get("median")
        row["fraction_of_peak"] = minimum_bytes / (device_ms * 1e-3) / (peak_gbs * 1e9) \
            if device_ms and peak_gbs else None
        row["within_memory_allowance"] = None if peak is None else peak <= logits_bytes + vector_allowance
        rows.append(row)
    by_path = {row["path"]: row for row in rows}
    for row in rows:
        wall = row["wall_ms"]["median"]
        for name, baseline in (("oracle", "oracle"), ("compile", "compile"), ("compile_ro", "compile ro")):
            other = by_path.get(baseline)
            row[f"speedup_vs_{name}"] = other["wall_ms"]["median"] / wall if other else None
        if device.type == "cuda" and row["path"] in FUSED_PATHS:
            row["meets_targets"] = _targets(row, shape)
    return rows


def _targets(row: dict, shape: Shape) -> dict:
    floor = TARGETS["fraction_of_peak_64x200" if (shape.batch, shape.classes) == (64, 200) else "fraction_of_peak"]
    compile_speedups = [v for v in (row["speedup_vs_compile"], row["speedup_vs_compile_ro"]) if v is not None]
    return {
        "fraction_of_peak": None if row["fraction_of_peak"] is None else row["fraction_of_peak"] >= floor,
        "host_ms": row["host_ms"]["median"] <= TARGETS["host_ms"],
        # against both compile modes
        "speedup_vs_compile": min(compile_speedups) >= TARGETS["speedup_vs_compile"] if compile_speedups else None,
        "speedup_vs_oracle": None if row["speedup_vs_oracle"] is None
        else row["speedup_vs_oracle"] >= TARGETS["speedup_vs_oracle"],
        "peak_extra_memory": row["within_memory_allowance"],
    }


COLUMNS = (("B x K x H x W", 15), ("layout", 14), ("path", 22), ("wall ms [min-max]", 27), ("host ms", 27),
           ("device ms", 27), ("%peak", 7), ("xoracle", 8), ("xcomp", 7), ("xcompRO", 8), ("mem/S", 7))


def _format_row(row: dict) -> str:
    def timing(stats):
        return "-" if stats is None else f"{stats['median']:.3f} [{stats['min']:.3f}-{stats['max']:.3f}]"

    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    percent = None if row["fraction_of_peak"] is None else 100 * row["fraction_of_peak"]
    values = (row["shape"], row["layout"], row["path"], timing(row["wall_ms"]), timing(row["host_ms"]),
              timing(row["device_ms"]), ratio(percent),
              ratio(row["speedup_vs_oracle"]), ratio(row["speedup_vs_compile"]), ratio(row["speedup_vs_compile_ro"]),
              ratio(row["peak_extra_in_logits"]))
    return "  " + "".join(f"{value:<{width}}" if index < 3 else f"{value:>{width}}"
                          for index, (value, (_, width)) in enumerate(zip(values, COLUMNS)))


def main(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    rep = args.rep or (20 if device.type == "cuda" else 2)
    repeats = args.repeats or (5 if device.type == "cuda" else 3)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if rep < 1 or repeats < 3:
        raise SystemExit(f"--rep {rep} --repeats {repeats}: expected at least 1 step and 3 repeats")
    shapes = args.shapes or [Shape.parse(text) for text in (PAPER_SHAPES if device.type == "cuda" else SMOKE_SHAPES)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    peak_gbs = _peak_bandwidth_gbs(device, args.peak_gbs)
    print(f"bench head on {device_name}: dtype {args.dtype}, prior {args.prior}, loss {args.objective}, "
          f"peak {peak_gbs or '?'} GB/s, {repeats} repeats of {rep} steps")
    if device.type == "cpu":
        print("  smoke mode: the interpreter runs the kernels on numpy; times say nothing about GPU speed")

    checks = [] if args.skip_checks else run_checks(device)
    # the L2 is flushed before each timed step, so every path reads its inputs from DRAM
    l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    print("  " + "".join(f"{name:<{width}}" if index < 3 else f"{name:>{width}}"
                         for index, (name, width) in enumerate(COLUMNS)))
    rows = []
    for shape in shapes:
        for layout in args.layouts:
            for row in _bench(shape, layout, args, device, rep, repeats, l2_flush, peak_gbs):
                rows.append(row)
                print(_format_row(row))
    print("  oracle = the naive oracle (eager PyTorch, calm_fast.head); %peak from the minimum bytes 3·B·K·N·e "
          "over the device time; mem/S = peak extra memory in units of S")

    results = {"part": "head", "device": device_name, "dtype": args.dtype, "prior": args.prior,
               "objective": args.objective, "steps_per_repeat": rep, "repeats": repeats,
               "peak_bandwidth_gbs": peak_gbs, "targets": TARGETS, "correctness": checks, "benchmarks": rows}
    if args.out:
        write_json(args.out, results)
        print(f"  results written to {args.out}")
    return 0 if all(check["passed"] for check in checks) else 1
