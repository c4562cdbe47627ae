"""Train a WSOL model (CAM, CALM-EM, CALM-ML) on a DeepSpeed engine: one process, deepspeed or torchrun.

    calm-fast train --config configs/experiments/cub_resnet50_calm-em.toml [section.key=value ...]
    calm-fast train --config ... --resume          continue the newest checkpoint of run_dir
    calm-fast train --config ... --export          write run_dir/model.pt from the newest checkpoint and exit

One loop, `train(cfg)`: DeepSpeed is the engine in every case (ZeRO 1/2, fp32/bf16/fp16, gradient
accumulation and clipping), with the reference recipe of CALM.md §3 (SGD Nesterov, two LR groups ×1/×10,
step decay per epoch) or cosine with warm-up. `data.batch_size` is the global batch: each optimizer step
consumes the same samples whatever the number of ranks and accumulation steps, so runs with the same
global batch follow the same trajectory. Everything goes under `run_dir`: config.toml, metrics.jsonl (one
JSON record per line), tensorboard/, checkpoints/, model.pt, summary.json.

Launchers: `torchrun --nproc_per_node N -m calm_fast.cli train ...` or `deepspeed --no_local_rank --module
calm_fast.cli train ...`; launch/ has multi-node (ssh and no-ssh) and SLURM scripts. A rank that dies makes
the job fail: collectives with the dead rank raise, and a rank that waits longer than
dist.watchdog_minutes for a step stops with a message (DeepSpeed's own process groups do not inherit
dist.timeout_minutes). `--resume` restores weights, optimizer, LR-scheduler step, data position and RNG
states; the LR schedule's shape comes from the current config. On CPU each rank uses (cores / ranks per
node) threads unless OMP_NUM_THREADS is set; on a machine shared with other jobs OMP_NUM_THREADS=1 is
often much faster.

"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from calm_fast.config import load_config
from calm_fast.distributed import in_multi_rank_job, report_rank_failure
from calm_fast.errors import is_user_error
from calm_fast.models.weights import checkpoint_root, usable_checkpoint
from calm_fast.train.checkpoint import export_model
from calm_fast.train.loop import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="TOML", help="experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. optim.lr=0.02 train.max_steps=100 run_dir=runs/x")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run_dir")
    parser.add_argument("--export", action="store_true",
                        help="write run_dir/model.pt (consolidated fp32 state dict) from the newest checkpoint "
                             "of run_dir (or --checkpoint) and exit")
    parser.add_argument("--checkpoint", metavar="DIR", help="with --export: the checkpoint folder to export")


def main(args: argparse.Namespace) -> int:
    """Errors the user can fix propagate to calm_fast.cli, which prints them as one line."""
    cfg = load_config(args.config, args.overrides)
    if args.export:
        source = Path(args.checkpoint) if args.checkpoint else usable_checkpoint(cfg.run_dir)
        if source is None:
            raise FileNotFoundError(f"--export: no usable checkpoint under {checkpoint_root(cfg.run_dir)}")
        print(export_model(source, Path(cfg.run_dir) / "model.pt"))
        return 0
    try:
        summary = train(cfg, resume=args.resume)
    except Exception as error:
        if not in_multi_rank_job() or is_user_error(error):
            raise
        return report_rank_failure("train", error)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
