"""FFCV loaders against a plain PyTorch DataLoader: images/s on the same JPEGs, transforms and workers.

Both loaders read one split. The plain one (calm_fast.data.torch_loader: PIL decoding and torchvision
transforms in DataLoader worker processes) reads the original JPEG files; FFCV reads the split's .beton
(converted here when missing or stale, JPEG quality 90, which is what the synthetic generator writes
too). Modes: "train" (the reference recipe: resize to resize_size², random crop input_size, flip) and
"eval" (resize straight to input_size²). Each repeat times one full epoch of each loader, the two
alternating so that drifting machine load hits both alike, after one untimed warm-up epoch each (numba
compiles FFCV's pipeline then; the DataLoader starts its workers). The report gives the median images/s
of each loader and their ratio (target: FFCV >= 3x). Without --data-root, a synthetic set is generated
under --work-dir and kept for later runs.

    calm-fast bench loader --out runs/bench/loader.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from calm_fast.atomic import write_json
from calm_fast.data.ffcv_convert import ConvertOptions, ensure_beton
from calm_fast.data.ffcv_loader import build_ffcv_loader
from calm_fast.data.metadata import default_image_root, default_metadata_root, read_split
from calm_fast.data.synthetic import generate
from calm_fast.data.torch_loader import build_torch_loader
from calm_fast.distributed import usable_cores

TARGET_RATIO = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", help="dataset in the WSOL layout (default: generate a synthetic one)")
    parser.add_argument("--dataset", default="SYNTH", help="dataset name with --data-root (default: SYNTH)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--image-root", help="image root of the split (default per DATA.md)")
    parser.add_argument("--work-dir", default="runs/bench/loader-data",
                        help="where the synthetic set and the .beton files go (default: runs/bench/loader-data)")
    parser.add_argument("--images", type=int, default=1024, help="images of the synthetic set (default: 1024)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic images (default: 256)")
    parser.add_argument("--modes", default="train,eval", help="comma-separated: train, eval (default: both)")
    parser.add_argument("--input-size", type=int, default=224, help="network input side (default: 224)")
    parser.add_argument("--resize-size", type=int, default=256, help="training resize side (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader processes and FFCV threads (default: usable cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loader (default: 5)")
    parser.add_argument("--out", help="write the results as JSON to this file")


def _prepare_split(args: argparse.Namespace):
    """The WSOLSplit to read: the given dataset, or a synthetic one generated (once) under --work-dir."""
    if args.data_root:
        image_root = args.image_root or default_image_root(args.data_root, args.dataset, args.split)
        return read_split(default_metadata_root(args.data_root), args.dataset, args.split, image_root)
    name = f"BENCH{args.image_size}"
    root = Path(args.work_dir)
    metadata = root / "metadata" / name / "train"
    existing = (metadata / "image_ids.txt").read_text().count("\n") if metadata.is_dir() else 0
    if existing != args.images:
        print(f"generating {args.images} synthetic images of about {args.image_size}px under {root}")
        generate(root, name=name, sizes={"train": args.images}, image_size=args.image_size,
                 workers=usable_cores(), overwrite=True)
    return read_split(root / "metadata", name, "train", root / name)


def _images_per_second(loader) -> float:
    """One full epoch; the batches are only counted (both loaders hand over finished tensors)."""
    start = time.perf_counter()
    count = 0
    for images, _, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def _bench_mode(split, beton: Path, train: bool, args, workers: int) -> dict:
    common = dict(train=train, input_size=args.input_size, resize_size=args.resize_size,
                  batch_size=args.batch_size, num_workers=workers)
    loaders = {
        "torch": build_torch_loader(split, **common),
        "ffcv": build_ffcv_loader(beton, **common),
    }
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for epoch in range(args.repeats + 1):
        for name, loader in loaders.items():
            if train and name == "torch":
                loader.sampler.set_epoch(epoch)
            rate = _images_per_second(loader)
            if epoch > 0:  # epoch 0 warms up: FFCV compiles, the DataLoader starts its workers
                rates[name].append(rate)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "images_per_second": rates,
        "median_images_per_second": medians,
        "ratio_ffcv_over_torch": medians["ffcv"] / medians["torch"],
    }


def main(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("train", "eval") for m in modes):
        raise SystemExit(f"--modes: expected train and/or eval, got {args.modes!r}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    console = Console()
    workers = args.workers or usable_cores()
    split = _prepare_split(args)
    summary = ensure_beton(split, Path(args.work_dir) / "ffcv", ConvertOptions(), num_workers=workers)
    beton = summary.beton_path

    results = {
        "part": "loader",
        "machine": {"cpu": platform.processor() or platform.machine(), "usable_cores": usable_cores(),
                    "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "dataset": {"name": split.dataset, "split": split.split, "images": len(split),
                    "mean_image_size": [float(v) for v in split.image_sizes.mean(axis=0)]},
        "beton": {"path": str(beton), "bytes": summary.file_bytes,
                  "conversion_seconds": None if summary.skipped else round(summary.seconds, 2)},
        "settings": {"input_size": args.input_size, "resize_size": args.resize_size, "batch_size": args.batch_size,
                     "workers": workers, "repeats": args.repeats},
        "target_ratio": TARGET_RATIO,
        "modes": {},
    }
    table = Table(title=f"loader images/s: {len(split)} images, batch {args.batch_size}, {workers} workers "
                        f"(median of {args.repeats} epochs)")
    for column in ("mode", "torch DataLoader", "FFCV", "FFCV / torch"):
        table.add_column(column, justify="right")
    for mode in modes:
        result = _bench_mode(split, beton, mode == "train", args, workers)
        results["modes"][mode] = result
        medians = result["median_images_per_second"]
        table.add_row(mode, f"{medians['torch']:.0f}", f"{medians['ffcv']:.0f}",
                      f"{result['ratio_ffcv_over_torch']:.2f}x")
    console.print(table)
    if args.out:
        console.print(f"results: {write_json(args.out, results)}")
    return 0
