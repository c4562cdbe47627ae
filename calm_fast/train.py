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
import logging
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from calm_fast import checkpoint as ckpt
from calm_fast.config import Config, ConfigError, atomic_write_text, load_config, save_config
from calm_fast.distributed import (Watchdog, World, all_reduce_sum, any_rank, barrier, init_world, share_cpu_threads,
                                   shutdown_world)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ DeepSpeed config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a run: the TOML's batch geometry, precision, ZeRO stage and clipping over
    the optional `train.deepspeed_json` (which holds the rest: buckets, loss-scaling details...)."""
    global_batch, accum = cfg.data.batch_size, cfg.train.grad_accum
    if global_batch % (accum * world_size):
        raise ConfigError(f"data.batch_size={global_batch} must be a multiple of train.grad_accum ({accum}) "
                          f"× number of ranks ({world_size})")
    # The settings the TOML owns (value, from where); a DeepSpeed JSON may leave them out, say "auto", or agree.
    owned = {
        "train_batch_size": (global_batch, "data.batch_size"),
        "train_micro_batch_size_per_gpu": (global_batch // (accum * world_size),
                                           "data.batch_size / (train.grad_accum × world size)"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
        "zero_optimization.stage": (cfg.train.zero_stage, "train.zero_stage"),
        "bf16.enabled": (cfg.train.precision == "bf16", "train.precision"),
        "fp16.enabled": (cfg.train.precision == "fp16", "train.precision"),
    }
    source = cfg.train.deepspeed_json
    config: dict[str, Any] = {}
    if source is not None:
        try:
            config = json.loads(Path(source).read_text())
        except OSError as error:
            raise ConfigError(f"train.deepspeed_json: cannot read {source} ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: invalid JSON: {error}") from None
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise ConfigError(f"{source}: remove the {section!r} section; calm-fast builds the optimizer and "
                                  "LR schedule from the [optim] section of the TOML config")
    for dotted, (value, owner) in owned.items():
        *parents, leaf = dotted.split(".")
        table = config
        for parent in parents:
            table = table.setdefault(parent, {})
        present = table.get(leaf, "auto")
        if present != "auto" and present != value:
            raise ConfigError(f"{source}: {dotted} = {present!r} disagrees with the TOML config ({value!r} from "
                              f"{owner}); remove it, set it to \"auto\", or make them agree")
        table[leaf] = value
    if cfg.train.precision == "fp16":
        # Dynamic loss scaling (loss_scale 0) unless the JSON says otherwise.
        for key, default in (("loss_scale", 0), ("initial_scale_power", 16), ("loss_scale_window", 1000),
                             ("hysteresis", 2), ("min_loss_scale", 1)):
            config["fp16"].setdefault(key, default)
    config.setdefault("zero_allow_untested_optimizer", True)  # SGD under ZeRO is fine; DeepSpeed asks anyway
    config.setdefault("steps_per_print", 2**31 - 1)  # our own log replaces DeepSpeed's
    return config


# ------------------------------------------------------------------------------------------- LR schedule


def lr_factor(step: int, cfg: Config, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the initial LRs for optimizer step `step` (0-based).

    step: ×lr_decay_factor every lr_decay_frequency epochs (the reference). cosine: from 1 down to
    min_lr_ratio over the steps after warm-up. Both: linear warm-up (step+1)/warmup_steps first.
    """
    optim = cfg.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "step":
        epoch = step // steps_per_epoch
        return optim.lr_decay_factor ** (epoch // optim.lr_decay_frequency)
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg: Config) -> torch.optim.SGD:
    """SGD (Nesterov) with the two groups of WSOLModel.parameter_groups(): base LR and ×head_lr_multiplier."""
    base, boosted = model.parameter_groups()
    optim = cfg.optim
    groups = [{"params": base, "lr": optim.lr, "name": "base"},
              {"params": boosted, "lr": optim.lr * optim.head_lr_multiplier, "name": "head"}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov, weight_decay=optim.weight_decay)


# ----------------------------------------------------------------------------------------------- data


def global_batch_indices(num_samples: int, global_batch: int, world_size: int, rank: int, grad_accum: int,
                         seed: int, epoch: int, first_step: int = 0) -> Iterator[np.ndarray]:
    """Sample indices of this rank's micro-batches for one epoch, from optimizer step `first_step` on.

    The epoch's order is a permutation seeded by (seed, epoch); optimizer step b takes the global batch
    perm[b·G : (b+1)·G] and cuts it into world_size × grad_accum contiguous micro-batches, micro-step m of
    rank r taking chunk m·world_size + r. One rank with grad_accum = 2 thus sees exactly the micro-batches
    that two ranks see in one step. The incomplete last global batch is dropped.
    """
    micro = global_batch // (world_size * grad_accum)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    for step in range(first_step, num_samples // global_batch):
        for m in range(grad_accum):
            start = step * global_batch + (m * world_size + rank) * micro
            yield order[start:start + micro]


def _steps_per_epoch(num_samples: int, cfg: Config) -> int:
    """Optimizer steps per epoch: whole global batches only."""
    steps = num_samples // cfg.data.batch_size
    if steps == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                          f"({num_samples} images)")
    return steps


class TrainBatches:
    """The training data of one rank: `steps_per_epoch` and `micro_batches(epoch, first_step)`, which
    yields (images, labels, indices) for the optimizer steps first_step.. of the epoch. Any loader that
    offers these two members can replace it (see build_loaders).

    `dataset[(index, epoch)]` must return one sample whose augmentation depends on (seed, epoch, index)
    only (calm_fast.data.torch_loader.WSOLDataset does): then a sample looks the same whatever the number
    of ranks or workers, and a resumed run continues exactly.
    """

    def __init__(self, dataset, cfg: Config, world: World):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.cfg, self.world = cfg, world
        self.steps_per_epoch = _steps_per_epoch(self.num_samples, cfg)

    def micro_batches(self, epoch: int, first_step: int = 0):
        cfg, world = self.cfg, self.world
        batches = [[(int(i), epoch) for i in indices]
                   for indices in global_batch_indices(self.num_samples, cfg.data.batch_size, world.world_size,
                                                       world.rank, cfg.train.grad_accum, cfg.train.seed, epoch,
                                                       first_step)]
        workers = cfg.data.workers
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=world.device.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        return iter(loader)


def read_splits(cfg: Config):
    """(train split, val split) as WSOLSplit; the val labels are bounded by the train split's classes."""
    from calm_fast.evaluate import read_configured_split

    train_split = read_configured_split(cfg, cfg.data.train_split)
    return train_split, read_configured_split(cfg, cfg.data.val_split, train_split.num_classes)


class FFCVTrainBatches:
    """The training data of one rank from an FFCV .beton, with TrainBatches' two members.

    Each rank reads its own shard (the order of calm_fast.data.torch_loader.ShardSampler for (seed, epoch))
    in micro-batches of global_batch / (world_size × grad_accum). Resuming skips the batches already
    consumed in the epoch, so a resumed run continues at the same samples; FFCV does not seed its crops and
    flips, so unlike TrainBatches it is not bitwise identical, and N ranks see another partition of each
    global batch than 1 rank does.
    """

    def __init__(self, loader, cfg: Config, num_samples: int):
        self.loader = loader
        self.grad_accum = cfg.train.grad_accum
        self.steps_per_epoch = _steps_per_epoch(num_samples, cfg)

    def micro_batches(self, epoch: int, first_step: int = 0):
        self.loader.set_epoch(epoch, skip_batches=first_step * self.grad_accum)
        wanted = (self.steps_per_epoch - first_step) * self.grad_accum
        for count, batch in enumerate(self.loader):
            if count == wanted:
                break
            yield batch


def build_loaders(cfg: Config, world: World, train_split, val_split):
    """(training batches, validation loader) for this rank: the one place that picks the loader.

    data.loader: "torch" reads the image files (our global-batch sampler: rank-invariant and bitwise
    resumable); "ffcv" reads the .beton files of `calm-fast convert`; "auto" takes FFCV for each split whose
    .beton exists and matches the metadata, else torch (`calm_fast.evaluate.loader_kind`).
    """
    from calm_fast.data import torch_loader
    from calm_fast.evaluate import build_eval_loader, loader_kind

    data = cfg.data
    val_loader = build_eval_loader(replace(cfg, eval=replace(cfg.eval, batch_size=data.eval_batch_size)),
                                   val_split, world.rank, world.world_size, world.device)
    kind, beton = loader_kind(cfg, train_split)
    if kind == "ffcv":
        from calm_fast.data import ffcv

        micro = data.batch_size // (world.world_size * cfg.train.grad_accum)
        dtype = DTYPES[cfg.train.precision] if world.device.type == "cuda" else torch.float32
        loader = ffcv.build_ffcv_loader(beton, train=True, input_size=data.input_size,
                                        resize_size=data.resize_size, batch_size=micro,
                                        num_workers=max(1, data.workers), rank=world.rank,
                                        world_size=world.world_size, seed=cfg.train.seed, device=world.device,
                                        dtype=dtype, drop_last=True)
        return FFCVTrainBatches(loader, cfg, len(train_split)), val_loader
    # The sampling is ours (TrainBatches): global batches that do not depend on the number of ranks.
    train_dataset = torch_loader.WSOLDataset(train_split, train=True, input_size=data.input_size,
                                             resize_size=data.resize_size, seed=cfg.train.seed)
    return TrainBatches(train_dataset, cfg, world), val_loader


class RunLog:
    """metrics.jsonl, TensorBoard scalars and the rich progress bar; active on rank 0 only."""

    def __init__(self, cfg: Config, world: World, total_steps: int, start_step: int):
        self.active = world.is_main
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.writer = None
        self.progress = None
        if not self.active:
            return
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"), purge_step=start_step or None)
        if cfg.train.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def record(self, entry: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            kind = entry.get("kind", "train")
            for key, value in entry.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, entry["step"])
        if self.progress is None:
            return
        if entry.get("kind") == "train":
            status = (f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['images_per_s']:.0f} img/s")
            self.progress.update(self.task, completed=entry["step"], status=status)
        if not self.progress.console.is_terminal or entry.get("kind") != "train":
            self.progress.console.print(json.dumps(entry), soft_wrap=True, highlight=False, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------- validation


def validate(engine, val_loader, val_split, cfg: Config, world: World, dtype: torch.dtype) -> dict[str, Any]:
    """Validation on the val split, every rank a shard. With train.val_localization: the metrics of
    `calm-fast eval` (calm_fast.evaluate.evaluate_model: classification and MaxBoxAccV2 / PxAP);
    otherwise only top-1 classification accuracy, counted here. Collective."""
    model = engine.module
    if cfg.train.val_localization:
        from calm_fast.evaluate import evaluate_model

        metrics = evaluate_model(model, val_split, cfg, world=world, dtype=dtype)
        return {key: value for key, value in metrics.items() if isinstance(value, (int, float, str))}
    from calm_fast.head import class_log_probs

    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        for images, labels, _ in val_loader:
            class_logits, location_scores = model(images.to(world.device, dtype=dtype))
            predicted = class_log_probs(class_logits, location_scores, cfg.model.method, cfg.model.prior).argmax(1)
            counts[0] += int((predicted.cpu() == labels.cpu()).sum())
            counts[1] += len(labels)
    all_reduce_sum(counts)
    model.train(was_training)
    return {"cls_top1_acc": 100.0 * counts[0].item() / max(1, counts[1].item()), "num_images": counts[1].item()}


# ------------------------------------------------------------------------------------------- the loop


@dataclass
class _Window:
    """Loss and throughput since the last metric record."""

    start: float
    steps: int = 0
    loss_sum: torch.Tensor | float = 0.0  # a float64 tensor on the device once a step is in
    paused: float = 0.0  # seconds spent on checkpoints and validation


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train according to `cfg` (resuming the newest checkpoint when asked); return the run summary."""
    world = init_world(cfg.dist.timeout_minutes)
    watchdog = Watchdog(cfg.dist.watchdog_minutes * 60, world.rank).start()
    try:
        return _train(cfg, world, watchdog, resume)
    finally:
        watchdog.stop()
        shutdown_world()


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: Config, world: World, watchdog: Watchdog, resume: bool) -> dict[str, Any]:
    from calm_fast.head import calm_loss, method_objective

    _quiet_deepspeed()
    share_cpu_threads(world)
    run_dir = Path(cfg.run_dir)
    existing = _check_run_dir(cfg, world, resume)

    _seed_everything(cfg.train.seed)  # identical model initialisation on every rank
    train_split, val_split = read_splits(cfg)
    train_batches, val_loader = build_loaders(cfg, world, train_split, val_split)
    steps_per_epoch = train_batches.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    dtype = DTYPES[cfg.train.precision]
    engine = _build_engine(cfg, world, train_split.num_classes, steps_per_epoch, total_steps)
    _seed_everything(cfg.train.seed + world.rank)

    geometry = {"global_batch": cfg.data.batch_size, "steps_per_epoch": steps_per_epoch,
                "world_size": world.world_size}
    step = _restore(engine, existing, world, geometry) if resume else 0
    if world.is_main:
        if resume:
            truncate_metrics(run_dir / "metrics.jsonl", step)
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    objective = method_objective(cfg.model.method)
    log = RunLog(cfg, world, total_steps, step)
    deadline = None if cfg.train.max_minutes is None else time.monotonic() + cfg.train.max_minutes * 60
    checkpoint_path: Path | None = existing
    last_val: dict[str, Any] | None = None
    stop_reason = "finished" if step >= total_steps else None
    window = _Window(time.perf_counter())
    throughput = []
    engine.train()
    try:
        while stop_reason is None:
            epoch, first_step = divmod(step, steps_per_epoch)
            step_at_start = step
            micro_step = 0
            # The loss stays on the device until a record is written: no GPU sync per step for logging.
            step_loss = torch.zeros((), dtype=torch.float64, device=world.device)
            for images, labels, _ in train_batches.micro_batches(epoch, first_step):
                if micro_step == 0:
                    step_lrs = _learning_rates(engine)  # the LRs this optimizer step uses
                # Channels-last input makes the convolutions run channels-last (1.4x on CPU, faster tensor
                # cores on GPU); parameters stay contiguous, as DeepSpeed's flat buffers require.
                images = images.to(world.device, dtype=dtype, non_blocking=True,
                                   memory_format=torch.channels_last)
                labels = labels.to(world.device, non_blocking=True)
                class_logits, location_scores = engine(images)
                loss = calm_loss(class_logits, location_scores, labels, objective=objective, prior=cfg.model.prior)
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach().double()
                micro_step += 1
                if micro_step < cfg.train.grad_accum:
                    continue
                # ---- one optimizer step done
                step += 1
                watchdog.beat(f"step {step}")
                window.steps += 1
                window.loss_sum = window.loss_sum + step_loss / cfg.train.grad_accum
                micro_step, step_loss = 0, torch.zeros((), dtype=torch.float64, device=world.device)
                epoch_end = step % steps_per_epoch == 0
                if deadline is not None and any_rank(time.monotonic() > deadline, world.device):
                    stop_reason = "time budget (train.max_minutes)"
                elif step >= total_steps:
                    stop_reason = "finished"
                if step % cfg.train.log_every == 0 or epoch_end or stop_reason:
                    entry = _train_record(window, step, steps_per_epoch, step_lrs, cfg, world)
                    throughput.append(entry["images_per_s"])
                    log.record(entry)
                    window = _Window(time.perf_counter())
                every = cfg.train.checkpoint_every
                paused_from = time.perf_counter()  # checkpoints and validation do not count as training time
                if epoch_end or stop_reason or (every and step % every == 0):
                    client_state = {"step": step, "epoch": step // steps_per_epoch, **geometry}
                    checkpoint_path = ckpt.save_checkpoint(engine, cfg, world, step, client_state)
                    watchdog.beat(f"checkpoint at step {step}")
                val_every = cfg.train.val_every
                if val_every and ((epoch_end and (step // steps_per_epoch) % val_every == 0) or stop_reason):
                    last_val = validate(engine, val_loader, val_split, cfg, world, dtype)
                    watchdog.beat(f"validation at step {step}")
                    log.record({"kind": "val", "step": step, "epoch": step / steps_per_epoch, **last_val})
                window.paused += time.perf_counter() - paused_from
                if stop_reason or epoch_end:
                    break
            if step == step_at_start:
                raise RuntimeError(f"the training loader yielded no complete optimizer step in epoch {epoch} "
                                   f"(from step {first_step} of {steps_per_epoch})")
    finally:
        log.close()

    model_path = None
    if cfg.train.export and checkpoint_path is not None:
        model_path = run_dir / "model.pt"
        if world.is_main:
            ckpt.export_model(checkpoint_path, model_path)
        barrier()
    summary = {"steps": step, "total_steps": total_steps, "epochs": step / steps_per_epoch,
               "loader": "ffcv" if isinstance(train_batches, FFCVTrainBatches) else "torch",
               "stopped": stop_reason, "world_size": world.world_size, "precision": cfg.train.precision,
               "zero_stage": cfg.train.zero_stage, "val": last_val,
               "images_per_s_median": float(np.median(throughput)) if throughput else None,
               "checkpoint": str(checkpoint_path) if checkpoint_path else None,
               "model": str(model_path) if model_path else None}
    if world.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _check_run_dir(cfg: Config, world: World, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite a run by accident.
    Writes the run's config.toml."""
    run_dir = Path(cfg.run_dir)
    existing = ckpt.latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({existing.name}); pass --resume to "
                              "continue that run, or choose another run_dir")
    if resume and existing is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {ckpt.checkpoint_root(run_dir)}")
    barrier()  # every rank has looked before rank 0 writes anything
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    return existing


def _build_engine(cfg: Config, world: World, num_classes: int, steps_per_epoch: int, total_steps: int):
    """Model, SGD with the two LR groups, LR schedule, all wrapped in a DeepSpeed engine."""
    import deepspeed

    from calm_fast.models import build_model

    model = build_model(cfg.model.backbone, num_classes, cfg.model.method,
                        large_feature_map=cfg.model.large_feature_map, pretrained=cfg.model.pretrained,
                        batch_norm=cfg.model.batch_norm)
    if cfg.model.sync_batchnorm and world.world_size > 1:
        if world.device.type != "cuda":
            raise ConfigError("model.sync_batchnorm needs CUDA ranks (PyTorch's SyncBatchNorm has no CPU path)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm needs both in one dtype.
    model.to(world.device, dtype=DTYPES[cfg.train.precision])
    optimizer = build_optimizer(model, cfg)
    # A plain function (not a callable object), so the schedule always comes from the current config
    # while the scheduler's step count comes from the checkpoint.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world.world_size),
                                           dist_init_required=False)
    return engine


def _restore(engine, folder: Path, world: World, geometry: dict[str, int]) -> int:
    """Load a checkpoint into the engine and this rank's RNGs; return the optimizer steps done."""
    client_state, trainer_state = ckpt.load_checkpoint(engine, folder, world)
    saved = {key: client_state.get(key) for key in geometry}
    if saved != geometry:
        raise ValueError(f"{folder}: written with {saved}, this run has {geometry}; resume with the same "
                         "data.batch_size, training split and number of ranks")
    ckpt.restore_rng(trainer_state["rng"])
    step = int(client_state["step"])
    if world.is_main:
        print(f"[calm-fast] resumed from {folder} (step {step})", file=sys.stderr)
    return step


def _learning_rates(engine) -> dict[str, float]:
    """{"lr": base group, "lr_head": the ×head_lr_multiplier group} as the optimizer holds them now."""
    lrs = {group.get("name"): group["lr"] for group in engine.optimizer.param_groups}
    return {"lr": lrs.get("base", lrs.get("head")), "lr_head": lrs.get("head", lrs.get("base"))}


def _train_record(window: _Window, step: int, steps_per_epoch: int, lrs: dict[str, float], cfg: Config,
                  world: World) -> dict:
    """The train metrics of the window that ends at `step` (LRs of that step), loss averaged over ranks
    (a collective)."""
    loss = torch.as_tensor(window.loss_sum, dtype=torch.float64, device=world.device).reshape(1)
    all_reduce_sum(loss)
    elapsed = max(1e-9, time.perf_counter() - window.start - window.paused)
    return {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
            "loss": loss.item() / (world.world_size * window.steps), **lrs,
            "images_per_s": window.steps * cfg.data.batch_size / elapsed}


# ------------------------------------------------------------------------------------------------- CLI


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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"calm-fast train: {error}", file=sys.stderr)
        return 2
    if args.export:
        source = Path(args.checkpoint) if args.checkpoint else ckpt.latest_checkpoint(cfg.run_dir)
        if source is None:
            print(f"calm-fast train --export: no checkpoint under {ckpt.checkpoint_root(cfg.run_dir)}",
                  file=sys.stderr)
            return 1
        print(ckpt.export_model(source, Path(cfg.run_dir) / "model.pt"))
        return 0
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        summary = train(cfg, resume=args.resume)
    except ConfigError as error:
        print(f"calm-fast train: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not multi_rank:
            raise
        # In a multi-rank job the launcher stops the others when one rank exits non-zero; say which
        # rank failed and why, since a collective error is often only the echo of another rank's death.
        rank = os.environ.get("RANK", "?")
        traceback.print_exc()
        print(f"[calm-fast] rank {rank} failed: {type(error).__name__}: {error}. If this is a communication "
              "error, another rank probably died first: look for its message above.", file=sys.stderr, flush=True)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
