"""Fused Triton CALM head against plain PyTorch and torch.compile: correctness, fwd+bwd time, bandwidth, memory.

On a GPU (the default when one is visible) this first checks the fused head against the plain-PyTorch
oracle on the device (values, log posterior, gradients, the EM loss; several dtypes, layouts and edge
cases), then times forward+backward of the training loss (calm_loss, objective EM) at the paper's shapes
(B = 64 and 256, K = 200 and 1000, 28x28, bf16) for the fused head, the plain-PyTorch head and
torch.compile of it. It prints the median time, the fused path's achieved DRAM bandwidth against the card's
peak (and against a measured device copy), and the peak memory each path allocates beyond its inputs.

`--device cpu` is a smoke mode: the same checks and timings on tiny shapes under the Triton interpreter
(TRITON_INTERPRET=1, set here); its timings say nothing about speed. Exit status 1 when a check fails.
Targets on the GPU: >= 3x the plain head, >= 1.5x torch.compile, >= 70% of peak bandwidth, peak extra
memory <= one [B, K, N] tensor (the gradient of S) plus per-cell and per-class vectors.

    python -m calm_fast.cli bench head --out runs/bench/head.json
    python -m calm_fast.cli bench head --device cpu --out runs/bench/head-smoke.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from calm_fast import head
from calm_fast.atomic import write_json
from calm_fast.modes import Prior

PAPER_SHAPES = ("64x200x28x28", "64x1000x28x28", "256x200x28x28", "256x1000x28x28")
SMOKE_SHAPES = ("2x10x3x5",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
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
TARGETS = {"speedup_vs_torch": 3.0, "speedup_vs_compile": 1.5, "fraction_of_peak": 0.7, "peak_extra_in_logits": 1.0}


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
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16", help="input dtype of S and a")
    parser.add_argument("--prior", choices=tuple(Prior), default=Prior.RELU)
    parser.add_argument("--objective", choices=("em", "ml"), default="em", help="the loss timed fwd+bwd")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time torch.compile of the plain head (default: on GPU only)")
    parser.add_argument("--rep", type=int, default=None, help="timed repetitions (default 50 on GPU, 3 on cpu)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the card's peak DRAM bandwidth in GB/s (default: looked up by device name)")
    parser.add_argument("--configs", nargs="*", default=(), metavar="BNxBKxWARPS",
                        help="also time the bare fused op with these block configs, e.g. 32x128x4 16x256x8")
    parser.add_argument("--skip-checks", action="store_true", help="only time, skip the correctness checks")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def _resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench head: --device cuda but no CUDA device is visible")
    if choice == "cpu":
        if "calm_fast.kernels.calm_head" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench head --device cpu: the kernels were imported without TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module creates its @triton.jit functions
    return torch.device(choice)


# ----------------------------------------------------------------------------------------------------------
# Correctness on the device


@dataclass(frozen=True)
class CheckCase:
    batch: int
    classes: int
    height: int
    width: int
    dtype: torch.dtype
    prior: str
    channels_last: bool = False
    zero_prior_image: bool = False  # image 0 gets relu(a) = 0 everywhere, cells of image 1 partly zero
    scale: float = 3.0  # logits ~ scale · N(0, 1); 1e4 checks the extreme-logit stability

    def name(self) -> str:
        extras = [x for x, on in (("channels_last", self.channels_last), ("zero_prior", self.zero_prior_image),
                                  (f"scale={self.scale:g}", self.scale != 3.0)) if on]
        dtype = str(self.dtype).removeprefix("torch.")
        return " ".join([f"{self.batch}x{self.classes}x{self.height}x{self.width}", dtype, self.prior, *extras])


GPU_CHECKS = (
    CheckCase(8, 200, 28, 28, torch.bfloat16, "relu"),
    CheckCase(8, 1000, 28, 28, torch.bfloat16, "softmax", channels_last=True),
    CheckCase(4, 1000, 28, 28, torch.float16, "relu", zero_prior_image=True),
    CheckCase(5, 37, 7, 9, torch.float32, "relu", channels_last=True, zero_prior_image=True),
    CheckCase(3, 203, 56, 56, torch.float32, "softmax"),
    CheckCase(4, 200, 28, 28, torch.float32, "relu", scale=1e4),
    CheckCase(4, 200, 28, 28, torch.float32, "softmax", scale=1e4),
    CheckCase(3, 11, 5, 6, torch.float64, "relu", zero_prior_image=True),
)
CPU_CHECKS = (
    CheckCase(2, 37, 5, 9, torch.bfloat16, "relu", zero_prior_image=True),
    CheckCase(2, 70, 10, 10, torch.float32, "softmax", channels_last=True),
    CheckCase(2, 11, 5, 6, torch.float32, "relu", scale=1e4),
    CheckCase(2, 5, 3, 4, torch.float64, "softmax"),
)


def _check_inputs(case: CheckCase, device: torch.device):
    g = torch.Generator().manual_seed(case.classes * 1000 + case.height)
    s = case.scale * torch.randn(case.batch, case.classes, case.height, case.width, generator=g)
    a = (case.scale if case.scale != 3.0 else 1.0) * torch.randn(case.batch, 1, case.height, case.width, generator=g)
    if case.zero_prior_image:
        a[0] = -a[0].abs()
        if case.batch > 1:
            a[1, :, : case.height // 2] = 0.0
    labels = torch.randint(0, case.classes, (case.batch,), generator=g)
    upstream = torch.randn(case.batch, case.classes, generator=g)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    s = s.to(device=device, dtype=case.dtype).contiguous(memory_format=memory_format)
    return s, a.to(device=device, dtype=case.dtype), labels.to(device), upstream.to(device)


def _head_outputs(s, a, labels, upstream, prior, fused: bool):
    """log p(y|x), log posterior and their gradients under `upstream`, plus the EM loss and its gradients."""
    from calm_fast.kernels.calm_head import calm_head

    s, a = s.detach().requires_grad_(), a.detach().requires_grad_()
    b, k, h, w = s.shape
    if fused:
        log_marginal, log_posterior = calm_head(s.reshape(b, k, h * w), a.reshape(b, h * w), prior, labels)
    else:
        log_marginal = head.log_marginal(s, a, prior, backend="torch")
        joint = head.log_joint(s, a, prior)[torch.arange(b, device=s.device), labels]
        log_posterior = joint - torch.logsumexp(joint, dim=1, keepdim=True)
    grad_s, grad_a = torch.autograd.grad(log_marginal, (s, a), upstream.to(log_marginal.dtype))
    loss = head.calm_loss(s, a, labels, "em", prior, backend="triton" if fused else "torch")
    loss_grad_s, loss_grad_a = torch.autograd.grad(loss, (s, a))
    return {"log_marginal": log_marginal.detach(), "log_posterior": log_posterior.detach(), "grad_logits": grad_s,
            "grad_scores": grad_a, "em_loss": loss.detach(), "em_grad_logits": loss_grad_s,
            "em_grad_scores": loss_grad_a}


def _tolerance(case: CheckCase, name: str) -> dict:
    if case.scale > 100:  # log-values of size 1e4 carry an fp32 rounding of about 1e-3
        return {"rtol": 1e-2, "atol": 2e-2}
    if name.startswith(("grad", "em_grad")) and case.dtype in (torch.bfloat16, torch.float16):
        return {}  # torch's defaults for the dtype: one rounding of the fp32 gradient apart
    return {"rtol": 1e-4, "atol": 1e-5}


def run_checks(device: torch.device) -> list[dict]:
    results = []
    for case in GPU_CHECKS if device.type == "cuda" else CPU_CHECKS:
        s, a, labels, upstream = _check_inputs(case, device)
        fused = _head_outputs(s, a, labels, upstream, case.prior, fused=True)
        plain = _head_outputs(s, a, labels, upstream, case.prior, fused=False)
        errors, failures = {}, []
        for name, got in fused.items():
            want = plain[name]
            finite = torch.isfinite(want)
            errors[name] = float((got.double() - want.double())[finite].abs().max()) if finite.any() else 0.0
            try:
                # fp64 inputs: the fused head computes and returns fp64, the oracle fp32
                torch.testing.assert_close(got, want, check_dtype=case.dtype != torch.float64,
                                           **_tolerance(case, name))
            except AssertionError as error:
                failures.append(f"{name}: {str(error).splitlines()[0]}")
        results.append({"case": case.name(), "passed": not failures, "max_abs_error": errors,
                        "failures": failures})
        print(f"  check {case.name():<44} {'ok' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Timing


def _median_ms(fn, device: torch.device, rep: int, l2_flush: torch.Tensor | None) -> float:
    """Median time of fn() in ms over `rep` runs after warm-up; on CUDA with events and L2 flushed first."""
    for _ in range(3 if device.type == "cuda" else 1):
        fn()
    times = []
    for _ in range(rep):
        if device.type == "cuda":
            l2_flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


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


def _copy_bandwidth_gbs(device: torch.device) -> float | None:
    """A device-to-device copy of 1 GiB: what the card's DRAM delivers in practice (read + write)."""
    if device.type != "cuda":
        return None
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = _median_ms(lambda: target.copy_(source), device, 10, torch.empty(0, device=device))
    return 2 * 2**30 / (ms * 1e-3) / 1e9


def _loss_step(loss_fn, s, a, labels):
    loss = loss_fn(s, a, labels)
    return torch.autograd.grad(loss, (s, a))


def _bench_shape(shape: Shape, args, device, rep, l2_flush, peak_gbs, copy_gbs) -> dict:
    from calm_fast.kernels.calm_head import default_launch_config, dram_bytes

    dtype = DTYPES[args.dtype]
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(shape.batch, shape.classes, shape.height, shape.width, generator=g, device=device, dtype=dtype)
    a = torch.randn(shape.batch, 1, shape.height, shape.width, generator=g, device=device, dtype=dtype)
    labels = torch.randint(0, shape.classes, (shape.batch,), generator=g, device=device)
    s.requires_grad_()
    a.requires_grad_()
    loss = functools.partial(head.calm_loss, objective=args.objective, prior=args.prior)
    steps = {"fused": functools.partial(_loss_step, functools.partial(loss, backend="triton"), s, a, labels),
             "torch": functools.partial(_loss_step, functools.partial(loss, backend="torch"), s, a, labels)}
    if args.compile:
        compiled = torch.compile(functools.partial(loss, backend="torch"), dynamic=False)
        steps["compile"] = functools.partial(_loss_step, compiled, s, a, labels)

    cells = shape.height * shape.width
    config = default_launch_config(shape.classes, cells, s.element_size())
    traffic = dram_bytes(shape.batch, shape.classes, cells, s.element_size(), config.block_n)
    fused_bytes = traffic["forward"] + traffic["backward"]
    logits_bytes = s.numel() * s.element_size()
    vector_allowance = 16 * shape.batch * (shape.classes + cells)  # a few fp32 [B, N] and [B, K] vectors
    row = {"batch": shape.batch, "classes": shape.classes, "height": shape.height, "width": shape.width,
           "dtype": args.dtype, "block_n": config.block_n, "block_k": config.block_k, "fused_bytes": fused_bytes}
    for name in ("fused", "torch", "compile"):
        step = steps.get(name)
        row[f"{name}_ms"] = _median_ms(step, device, rep, l2_flush) if step else None
        peak = _peak_extra_bytes(step, device) if step else None
        row[f"{name}_peak_extra_bytes"] = peak
        row[f"{name}_peak_extra_in_logits"] = None if peak is None else peak / logits_bytes
    row["speedup_vs_torch"] = row["torch_ms"] / row["fused_ms"]
    row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"] if row["compile_ms"] else None
    row["fused_bandwidth_gbs"] = fused_bytes / (row["fused_ms"] * 1e-3) / 1e9
    row["fraction_of_peak"] = row["fused_bandwidth_gbs"] / peak_gbs if peak_gbs else None
    row["fraction_of_copy"] = row["fused_bandwidth_gbs"] / copy_gbs if copy_gbs else None
    peak_fused = row["fused_peak_extra_bytes"]
    row["meets_targets"] = None if device.type != "cuda" else {
        "speedup_vs_torch": row["speedup_vs_torch"] >= TARGETS["speedup_vs_torch"],
        "speedup_vs_compile": None if row["speedup_vs_compile"] is None
        else row["speedup_vs_compile"] >= TARGETS["speedup_vs_compile"],
        "fraction_of_peak": None if row["fraction_of_peak"] is None
        else row["fraction_of_peak"] >= TARGETS["fraction_of_peak"],
        "peak_extra_memory": peak_fused <= logits_bytes + vector_allowance,
    }
    row["configs"] = [_bench_config(text, s, a, labels, args.prior, device, rep, l2_flush) for text in args.configs]
    return row


def _bench_config(text, s, a, labels, prior, device, rep, l2_flush) -> dict:
    """fwd+bwd of the bare fused op (no loss arithmetic) with block config BNxBKxWARPS."""
    from calm_fast.kernels.calm_head import LaunchConfig, calm_head

    try:
        block_n, block_k, num_warps = (int(x) for x in text.lower().split("x"))
        config = LaunchConfig(block_n, block_k, num_warps)
    except ValueError as error:
        raise SystemExit(f"--configs {text!r}: expected BNxBKxWARPS, e.g. 32x128x4 ({error})") from None
    b, k, h, w = s.shape
    s3, a2 = s.reshape(b, k, h * w), a.reshape(b, h * w)
    upstream = torch.ones(b, k, device=device)

    def step():
        log_marginal, _ = calm_head(s3, a2, prior, labels, config=config)
        return torch.autograd.grad(log_marginal, (s, a), upstream)

    return {"config": text, "ms": _median_ms(step, device, rep, l2_flush)}


def _format_row(row: dict) -> str:
    def ms(value):
        return f"{value:9.3f}" if value is not None else "        -"

    def ratio(value, digits=2):
        return f"{value:7.{digits}f}" if value is not None else "      -"

    shape = f"{row['batch']}x{row['classes']}x{row['height']}x{row['width']}"
    memory = " ".join(ratio(row[f"{name}_peak_extra_in_logits"]) for name in ("fused", "torch", "compile"))
    return (f"  {shape:<16}{ms(row['fused_ms'])}{ms(row['torch_ms'])}{ms(row['compile_ms'])}"
            f"{ratio(row['speedup_vs_torch'])}{ratio(row['speedup_vs_compile'])}"
            f"{row['fused_bandwidth_gbs']:9.1f}{ratio(row['fraction_of_peak'])}  {memory}")


def main(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    rep = args.rep or (50 if device.type == "cuda" else 3)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if rep < 1:
        raise SystemExit(f"--rep {rep}: expected at least 1")
    shapes = args.shapes or [Shape.parse(text) for text in (PAPER_SHAPES if device.type == "cuda" else SMOKE_SHAPES)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    peak_gbs = _peak_bandwidth_gbs(device, args.peak_gbs)
    copy_gbs = _copy_bandwidth_gbs(device)
    print(f"bench head on {device_name}: dtype {args.dtype}, prior {args.prior}, loss {args.objective}, "
          f"peak {peak_gbs or '?'} GB/s, measured copy {f'{copy_gbs:.0f}' if copy_gbs else '?'} GB/s")
    if device.type == "cpu":
        print("  smoke mode: the interpreter runs the kernels on numpy; times say nothing about GPU speed")

    checks = [] if args.skip_checks else run_checks(device)
    # the L2 is flushed before each timed run, so every path reads its inputs from DRAM
    l2_flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    print(f"  {'B x K x H x W':<16}{'fused ms':>9}{'torch ms':>9}{'compile':>9}{'xtorch':>7}{'xcompile':>9}"
          f"{'GB/s':>8}{'%peak':>7}  peak extra memory in [B,K,N] tensors: fused torch compile")
    rows = []
    for shape in shapes:
        row = _bench_shape(shape, args, device, rep, l2_flush, peak_gbs, copy_gbs)
        rows.append(row)
        print(_format_row(row))
        for timed in row["configs"]:
            print(f"    config {timed['config']:<12} bare fused op {timed['ms']:9.3f} ms")

    results = {"part": "head", "device": device_name, "dtype": args.dtype, "prior": args.prior,
               "objective": args.objective, "repetitions": rep, "peak_bandwidth_gbs": peak_gbs,
               "copy_bandwidth_gbs": copy_gbs, "targets": TARGETS, "correctness": checks, "benchmarks": rows}
    if args.out:
        write_json(args.out, results)
        print(f"  results written to {args.out}")
    return 0 if all(check["passed"] for check in checks) else 1
