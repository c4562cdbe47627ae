"""Measure single-node throughput of each part against a baseline measured in the same run.

Parts: `loader` (FFCV vs a plain PyTorch DataLoader), `head` (fused Triton head vs plain PyTorch and
torch.compile), `train` (training steps/s), `metrics` (fast exact WSOL metrics vs the OpenCV loop),
`attribution` (remove-and-classify and gradient baselines against the model's own forward/backward cost),
`cue` (cue localization vs one plain inference pass), and `all`.
Each prints medians and ratios; `--out FILE` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import importlib

PARTS = ("loader", "head", "train", "metrics", "attribution", "cue")


def _part_modules():
    return {part: importlib.import_module(f"calm_fast.bench.{part}") for part in PARTS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parts = parser.add_subparsers(dest="part", metavar="PART", required=True)
    for part, module in _part_modules().items():
        sub = parts.add_parser(part, help=(module.__doc__ or "").strip().splitlines()[0],
                               description=(module.__doc__ or "").strip(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_bench_main=module.main)
    everything = parts.add_parser("all", help="every part, with its defaults, one after the other")
    everything.add_argument("--out-dir", default="runs/bench", help="folder for each part's JSON results")
    everything.set_defaults(_bench_main=_run_all)


def _run_all(args: argparse.Namespace) -> int:
    status = 0
    for part, module in _part_modules().items():
        sub = argparse.ArgumentParser(prog=f"calm-fast bench {part}")
        module.add_arguments(sub)
        part_args = sub.parse_args(["--out", f"{args.out_dir}/{part}.json"])
        status |= int(module.main(part_args) or 0)
    return status


def main(args: argparse.Namespace) -> int:
    return args._bench_main(args)
