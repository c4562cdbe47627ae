"""Training throughput on this node: ranks (`calm-fast train` on 1 rank against N) or heads (one step with
the CALM-EM head against the same backbone with a plain CAM head).

`--compare ranks` (default): each setting trains the same config for the same number of optimizer steps
in a fresh run folder, as a child process (N ranks under torchrun, the threads of the machine split evenly
between ranks), and reads the median images/s the loop logged (checkpointing, validation and start-up not
counted). The ratio N-ranks / 1-rank is the scaling on one node. A small synthetic dataset is generated
once under --data.

`--compare heads` (bench/train_heads.py): images/s of a full training step (forward, loss, backward, SGD) on
random images, in this process, per backbone, for the plain CAM head and the CALM-EM head with its loss
fused (GPU), in eager PyTorch (the naive oracle) and under torch.compile, with peak memory (GPU).

    python -m calm_fast.cli bench train --ranks 1 2 --steps 60 --out runs/bench/train.json
    python -m calm_fast.cli bench train --compare heads --out runs/bench/train-heads.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from calm_fast.atomic import write_json
from calm_fast.bench import train_heads as bench_heads
from calm_fast.config import load_config
from calm_fast.data.synthetic import generate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compare", choices=("ranks", "heads"), default="ranks",
                        help="ranks: 1 rank against N (calm-fast train); heads: CALM-EM heads against CAM")
    bench_heads.add_arguments(parser)
    parser.add_argument("--config", "-c", default="configs/synthetic.toml", help="experiment config to train")
    parser.add_argument("--data", default="runs/bench/data", help="data root (a synthetic set is made if absent)")
    parser.add_argument("--images", type=int, default=2048,
                        help="training images of the synthetic set made when --data has none (default: 2048)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="rank counts to compare")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per setting (ranks: default 60; heads: 20 on GPU, 4 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per setting; the median is reported (ranks: default 1; heads: 3, at least 3)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def _ensure_data(root: Path, dataset: str, images: int) -> None:
    if (root / "metadata" / dataset / "synthetic.json").exists():
        return
    generate(root, name=dataset, sizes={"train": images, "val": min(64, images), "test": min(64, images)})


def _train_once(args, ranks: int, work: Path) -> float:
    run_dir = work / f"ranks{ranks}-{len(list(work.iterdir()))}"
    overrides = [*args.overrides, f"data.root={args.data}", f"run_dir={run_dir}", f"train.max_steps={args.steps}",
                 "train.val_every=0", "train.checkpoint_every=0", "train.export=false", "train.progress=false",
                 "train.log_every=5"]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "calm_fast.cli", "train", "-c", args.config, *overrides]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   "-m", "calm_fast.cli", "train", "-c", args.config, *overrides]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench train: {ranks} rank(s) failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return float(summary["images_per_s_median"])


def main(args: argparse.Namespace) -> int:
    if args.compare == "heads":
        return bench_heads.main(args)
    args.steps, args.repeats = args.steps or 60, args.repeats or 1
    cfg = load_config(args.config, args.overrides)
    _ensure_data(Path(args.data), cfg.data.dataset, args.images)
    results = {}
    with tempfile.TemporaryDirectory(prefix="calm-fast-bench-train-") as tmp:
        for ranks in args.ranks:
            rates = [_train_once(args, ranks, Path(tmp)) for _ in range(args.repeats)]
            results[ranks] = {"images_per_s": statistics.median(rates), "runs": rates}
    base = results[args.ranks[0]]["images_per_s"]
    table = Table(title=f"training throughput ({cfg.model.backbone}, {cfg.data.input_size}px, "
                        f"{cfg.train.precision}, global batch {cfg.data.batch_size}, {args.steps} steps)")
    for column in ("ranks", "threads/rank", "images/s (median)", f"ratio vs {args.ranks[0]} rank(s)"):
        table.add_column(column, justify="right")
    for ranks, entry in results.items():
        entry["ratio"] = entry["images_per_s"] / base
        table.add_row(str(ranks), str(max(1, (os.cpu_count() or 1) // ranks)), f"{entry['images_per_s']:.1f}",
                      f"{entry['ratio']:.2f}")
    Console().print(table)
    if args.out:
        write_json(args.out, {"backbone": cfg.model.backbone, "input_size": cfg.data.input_size,
                              "precision": cfg.train.precision, "global_batch": cfg.data.batch_size,
                              "steps": args.steps, "cpu_count": os.cpu_count(),
                              "results": {str(k): v for k, v in results.items()}})
    return 0
