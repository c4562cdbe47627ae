"""`calm-fast bench train --compare heads`: what the CALM-EM head costs a training step, against plain CAM.

For each backbone, one full training step (forward with both heads as one conv, loss, backward, SGD with
Nesterov momentum and weight decay; bf16 weights and channels-last images, as `calm-fast train` runs them)
on random images, timed for these heads:

    cam                plain CAM: cross-entropy of the pooled class map (no location head)
    calm-em fused      CALM-EM, the loss as one fused op (calm_fast.kernels.calm_loss; GPU only: on a CPU the
                       Triton interpreter would time numpy, not the method)
    calm-em eager      CALM-EM, the loss in eager PyTorch (the naive oracle of calm_fast.head)
    calm-em compiled   CALM-EM, the oracle loss under torch.compile (with --compile; default on GPU)

images/s is batch · steps / time over `--steps` steps after warm-up, repeated `--repeats` times (median,
min-max), the variants taking turns within each repeat; "vs cam" is the median over repeats of a variant's
images/s over CAM's in the same repeat. Peak memory (GPU) is the most the step allocated.
Defaults: on GPU ResNet50 at 224 px (28×28 maps, batch 64) and tiny_resnet at 224 px (28×28, batch 256);
on CPU tiny_resnet at 112 px (14×14, batch 32), a small preset whose numbers depend on what else runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from calm_fast import head
from calm_fast.atomic import write_json
from calm_fast.modes import Precision, Prior

VARIANTS = ("cam", "calm-em fused", "calm-em eager", "calm-em compiled")
GPU_PRESETS = ("resnet50:224:64", "tiny_resnet:224:256")
CPU_PRESETS = ("tiny_resnet:112:32",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of --compare heads (--steps, --repeats and --out are shared with --compare ranks)."""
    parser.add_argument("--presets", nargs="+", default=None, metavar="BACKBONE:PIXELS:BATCH",
                        help=f"heads: backbones, input sizes and batches (default {' '.join(GPU_PRESETS)} on GPU, "
                             f"{' '.join(CPU_PRESETS)} on CPU)")
    parser.add_argument("--classes", type=int, default=200, help="heads: number of classes (CUB: 200)")
    parser.add_argument("--precision", choices=tuple(Precision), default=Precision.BF16,
                        help="heads: weights and inputs")
    parser.add_argument("--prior", choices=tuple(Prior), default=Prior.RELU, help="heads: CALM prior")
    parser.add_argument("--heads-device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="heads: where to run (auto: cuda when available)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="heads: also time the compiled oracle (default: on GPU only)")


def _parse_preset(text: str) -> tuple[str, int, int]:
    from calm_fast.models.backbones import BACKBONES  # lazy, like build_model: torchvision only when run

    try:
        backbone, pixels, batch = text.split(":")
        pixels, batch = int(pixels), int(batch)
    except ValueError:
        raise SystemExit(f"--presets {text!r}: expected BACKBONE:PIXELS:BATCH, e.g. resnet50:224:64") from None
    if backbone not in BACKBONES or pixels < 32 or batch < 1:
        raise SystemExit(f"--presets {text!r}: backbone one of {', '.join(BACKBONES)}, pixels >= 32, batch >= 1")
    return backbone, pixels, batch


def _loss_fn(variant: str, classes: int, prior: str):
    if variant == "cam":
        return functools.partial(head.merged_loss, num_classes=classes, objective="cam")
    backend = "triton" if variant == "calm-em fused" else "torch"
    loss = functools.partial(head.merged_loss, num_classes=classes, objective="em", prior=prior, backend=backend)
    return torch.compile(loss, dynamic=False) if variant == "calm-em compiled" else loss


def _train_step(model, optimizer, loss_fn, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(images, merged=True), labels).backward()
    optimizer.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _build_step(variant, backbone, pixels, batch, args, device):
    """(one training step of the variant, the side of its maps)."""
    from calm_fast.models import build_model  # lazy: every `calm-fast` command imports the bench parts

    torch.manual_seed(0)
    dtype = Precision(args.precision).dtype
    model = build_model(backbone, args.classes, "cam" if variant == "cam" else "calm-em").to(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    images = torch.randn(batch, 3, pixels, pixels, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    with torch.no_grad():
        side = model(images[:1], merged=True).shape[-1]
    return functools.partial(_train_step, model, optimizer, _loss_fn(variant, args.classes, args.prior), images,
                             labels), side


def _time_preset(variants, backbone, pixels, batch, args, device) -> list[dict]:
    """The variants' steps timed in turn within each repeat, so a change in the machine's load during the
    run hits them all alike; "vs cam" is then also taken repeat by repeat."""
    steps, sides = {}, {}
    for variant in variants:
        steps[variant], sides[variant] = _build_step(variant, backbone, pixels, batch, args, device)
        for _ in range(3):  # warm-up: kernels, cuDNN or oneDNN choices, compilation
            steps[variant]()
    rates = {variant: [] for variant in variants}
    peaks = dict.fromkeys(variants)
    for _ in range(args.repeats):
        for variant, step in steps.items():
            _synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            begin = time.perf_counter()
            for _ in range(args.steps):
                step()
            _synchronize(device)
            rates[variant].append(batch * args.steps / (time.perf_counter() - begin))
            if device.type == "cuda":
                peaks[variant] = max(peaks[variant] or 0, torch.cuda.max_memory_allocated())
    rows = []
    for variant, runs in rates.items():
        paired = [rate / cam for rate, cam in zip(runs, rates["cam"])]
        rows.append({"backbone": backbone, "pixels": pixels, "map": sides[variant], "batch": batch,
                     "variant": variant, "runs": runs, "peak_memory_bytes": peaks[variant],
                     "images_per_s": {"median": statistics.median(runs), "min": min(runs), "max": max(runs)},
                     "vs_cam": statistics.median(paired), "vs_cam_runs": paired})
    return rows


def main(args: argparse.Namespace) -> int:
    choice = args.heads_device
    device = torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench train --compare heads: --heads-device cuda but no CUDA device is visible")
    args.steps = args.steps or (20 if device.type == "cuda" else 4)
    args.repeats = args.repeats or 3
    if args.steps < 1 or args.repeats < 3:
        raise SystemExit(f"--steps {args.steps} --repeats {args.repeats}: expected >= 1 step and >= 3 repeats")
    compile_oracle = device.type == "cuda" if args.compile is None else args.compile
    presets = [_parse_preset(text) for text in args.presets or (GPU_PRESETS if device.type == "cuda"
                                                                 else CPU_PRESETS)]
    variants = [v for v in VARIANTS if (v != "calm-em fused" or device.type == "cuda")
                and (v != "calm-em compiled" or compile_oracle)]
    rows = [row for backbone, pixels, batch in presets
            for row in _time_preset(variants, backbone, pixels, batch, args, device)]

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = Table(title=f"training step with each head on {device_name} ({args.precision}, {args.classes} classes, "
                        f"{args.repeats} repeats of {args.steps} steps)")
    for column in ("backbone", "input", "map", "batch", "head", "images/s median [min-max]", "vs cam", "peak MB"):
        table.add_column(column, justify="left" if column in ("backbone", "head") else "right")
    for row in rows:
        rate = row["images_per_s"]
        peak = row["peak_memory_bytes"]
        table.add_row(row["backbone"], f"{row['pixels']}px", f"{row['map']}x{row['map']}", str(row["batch"]),
                      row["variant"], f"{rate['median']:.1f} [{rate['min']:.1f}-{rate['max']:.1f}]",
                      f"{row['vs_cam']:.3f}", "-" if peak is None else f"{peak / 2**20:.0f}")
    Console(width=132).print(table)
    if device.type == "cpu":
        print("  on CPU the fused head is not timed (the Triton interpreter would run it on numpy)")
    if args.out:
        write_json(args.out, {"part": "train heads", "device": device_name, "precision": args.precision,
                              "classes": args.classes, "prior": args.prior, "steps": args.steps,
                              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "results": rows})
    return 0
