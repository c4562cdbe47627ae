"""Cue localization against one plain inference pass over the same split, in one run.

Both go through the evaluation job (`evaluate_maps`) with the same loader and model: the plain pass runs
the model and takes the ground-truth class's map of each image (what every evaluation does); the cue pass
does the same forward pass and also scores every class pair of each image (all K class maps from that one
pass, resize, |.|, normalisation and the per-pair histograms). The passes alternate, --repeats times; the
medians of their wall-clock seconds, the ratio and the model inputs per image are reported. Target: the
cue pass takes at most 2x the plain pass, with one forward pass per image. The split is a synthetic test
split (generated into --data unless it is there: 1,000 images of 8 classes by default); the model is an
untrained tiny_resnet CALM-EM (the cost does not depend on the weights).

    python -m calm_fast.cli bench cue --out runs/bench/cue.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from calm_fast.atomic import write_json
from calm_fast.data.cue_truth import SyntheticCueTruth
from calm_fast.data.metadata import read_split
from calm_fast.data.synthetic import generate
from calm_fast.data.torch_loader import build_torch_loader
from calm_fast.evaluate.attribution.cue import CueLocalization
from calm_fast.evaluate.job import evaluate_maps
from calm_fast.evaluate.maps import ModelMaps
from calm_fast.evaluate.scoring import EvalSettings
from calm_fast.metrics.cue_bins import ThresholdGrid
from calm_fast.models import build_model
from calm_fast.modes import CueGrid

TARGET_RATIO = 2.0
DATASET = "CUEBENCH"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="runs/bench/cue-data", help="data root of the synthetic split")
    parser.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--num-classes", type=int, default=8)
    parser.add_argument("--map-kinds", nargs="+", default=["joint"], help="maps scored by the cue pass")
    parser.add_argument("--grid", choices=tuple(CueGrid), default=CueGrid.LOG)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each pass; medians reported")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def _split(args: argparse.Namespace):
    root = Path(args.data)
    if not (root / "metadata" / DATASET / "test").is_dir():
        generate(root, name=DATASET, seed=0, num_classes=args.num_classes, sizes={"test": args.images},
                 workers=max(1, args.workers))
    split = read_split(root / "metadata", DATASET, "test", root / DATASET, num_classes=args.num_classes)
    if len(split) != args.images:
        raise SystemExit(f"bench cue: {root} holds {len(split)} test images, not {args.images}; use another --data")
    return split


def main(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.images < 1:
        raise SystemExit("bench cue: --repeats and --images must be >= 1")
    console = Console() if sys.stdout.isatty() else Console(width=150)
    split = _split(args)
    truth = SyntheticCueTruth(split)
    torch.manual_seed(0)
    model = build_model("tiny_resnet", args.num_classes, "calm-em", large_feature_map=True).eval()
    settings = EvalSettings(wsol=False)

    def loader():
        return build_torch_loader(split, train=False, input_size=128, resize_size=144, batch_size=args.batch_size,
                                  num_workers=args.workers, rank=0, world_size=1, seed=0, drop_last=False)

    def plain():
        return evaluate_maps(ModelMaps(model, "calm-em", ("joint",)), split, loader(), settings)

    def cue():
        benchmark = CueLocalization(truth, args.map_kinds, grid=ThresholdGrid(args.grid))
        source = ModelMaps(model, "calm-em", ("joint",), class_map_kinds=tuple(args.map_kinds))
        return evaluate_maps(source, split, loader(), settings, cue=benchmark)

    cue()  # warm-up: numba loads its kernels, the files enter the page cache
    seconds: dict[str, list[float]] = {"plain": [], "cue": []}
    for _ in range(args.repeats):
        for name, run in (("plain", plain), ("cue", cue)):
            start = time.perf_counter()
            evaluation = run()
            seconds[name].append(time.perf_counter() - start)
            if name == "cue":
                cost = evaluation.cost
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ratio = medians["cue"] / medians["plain"]
    result = {
        "images": len(split), "num_classes": args.num_classes, "pairs": len(truth.pairs), "map_kinds": args.map_kinds,
        "grid": args.grid, "batch_size": args.batch_size, "workers": args.workers, "torch_threads": torch.get_num_threads(),
        "seconds": seconds, "median_seconds": medians, "ratio": ratio, "target_ratio": TARGET_RATIO,
        "forward_passes_per_image": cost["forward_passes_per_image"], "cue_cost": cost,
        "meets_target": bool(ratio <= TARGET_RATIO and cost["forward_passes_per_image"] <= 1.0),
    }
    console.print(f"plain inference pass: {medians['plain']:.2f} s, cue pass: {medians['cue']:.2f} s "
                  f"({len(split)} images, {len(truth.pairs)} class pairs, maps {', '.join(args.map_kinds)}): "
                  f"ratio {ratio:.2f} (target <= {TARGET_RATIO}), "
                  f"{cost['forward_passes_per_image']:.2f} forward passes per image")
    if args.out:
        write_json(args.out, result)
    return 0 if result["meets_target"] else 1
