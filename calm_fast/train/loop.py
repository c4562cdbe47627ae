"""The training loop, `train(cfg)`: one DeepSpeed engine in every case (one process, deepspeed or torchrun;
ZeRO 1/2, fp32/bf16/fp16, accumulation and clipping), global batches that do not depend on the number of
ranks, checkpoints at epoch ends (and every `train.checkpoint_every` steps), periodic validation, a time
budget, exact resume, and the export of a consolidated model at the end. A loss or gradient that stops
being finite fails the run, naming the step, before anything is saved after it (`divergence`).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from calm_fast.atomic import atomic_write_text
from calm_fast.config import Config, ConfigError, save_config
from calm_fast.data.loaders import FFCVTrainBatches, TrainBatches, build_eval_loader, build_train_batches
from calm_fast.data.metadata import WSOLSplit
from calm_fast.data.splits import read_configured_split
from calm_fast.distributed import (Watchdog, World, all_reduce_sum, any_rank, barrier, init_world, share_cpu_threads,
                                   shutdown_world)
from calm_fast.evaluate.job import evaluate_model
from calm_fast.head import class_log_probs, merged_loss, method_objective
from calm_fast.models import build_model
from calm_fast.errors import CheckpointError
from calm_fast.models.weights import checkpoint_root, latest_checkpoint
from calm_fast.modes import Precision
from calm_fast.train import checkpoint as ckpt
from calm_fast.train.divergence import DivergenceWatch
from calm_fast.train.log import RunLog, truncate_metrics
from calm_fast.train.optim import build_optimizer, deepspeed_config, lr_factor


@dataclass
class RunData:
    """The data of one rank's run, each piece built once: the splits, the training batches and the one
    validation loader (eval.batch_size images per batch, as `calm-fast eval` reads)."""

    train_split: WSOLSplit
    val_split: WSOLSplit
    train_batches: TrainBatches | FFCVTrainBatches
    val_loader: Iterable


def build_run_data(cfg: Config, world: World) -> RunData:
    """Read the train and val splits (both bounded by the configured class count) and build their loaders."""
    train_split = read_configured_split(cfg, cfg.data.train_split)
    val_split = read_configured_split(cfg, cfg.data.val_split, train_split.num_classes)
    return RunData(train_split, val_split, build_train_batches(cfg, world, train_split),
                   build_eval_loader(cfg, val_split, world.rank, world.world_size, world.device))


def validate(engine, val_loader, val_split, cfg: Config, world: World, dtype: torch.dtype,
             watchdog: Watchdog) -> dict[str, Any]:
    """Validation on the val split from `val_loader` (this rank's shard, built once by the loop with
    eval.batch_size). With train.val_localization: the metrics of `calm-fast eval`
    (calm_fast.evaluate.job.evaluate_model: classification and MaxBoxAccV2 / PxAP); otherwise only top-1
    classification accuracy, counted here. Collective; the watchdog hears every batch."""
    model = engine.module
    if cfg.train.val_localization:
        metrics = evaluate_model(model, val_split, cfg, world=world, dtype=dtype, loader=val_loader,
                                 heartbeat=watchdog.beat)
        return {key: value for key, value in metrics.items() if isinstance(value, (int, float, str))}
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        for images, labels, _ in val_loader:
            class_logits, location_scores = model(images.to(world.device, dtype=dtype))
            predicted = class_log_probs(class_logits, location_scores, cfg.model.method, cfg.model.prior).argmax(1)
            counts[0] += int((predicted.cpu() == labels.cpu()).sum())
            counts[1] += len(labels)
            watchdog.beat("validation")
    all_reduce_sum(counts)
    model.train(was_training)
    return {"cls_top1_acc": 100.0 * counts[0].item() / max(1, counts[1].item()), "num_images": counts[1].item()}


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
    # DeepSpeed is imported when training starts: it is slow to import and evaluation does not need it.
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(cfg: Config, world: World, watchdog: Watchdog, resume: bool) -> dict[str, Any]:
    _quiet_deepspeed()
    run_dir = Path(cfg.run_dir)
    existing = _check_run_dir(cfg, world, resume)

    _seed_everything(cfg.train.seed)  # identical model initialisation on every rank
    data = build_run_data(cfg, world)
    # After the loaders: building an FFCV loader sets torch's thread count to its worker count.
    share_cpu_threads(world)
    train_split, val_split, train_batches, val_loader = (data.train_split, data.val_split, data.train_batches,
                                                         data.val_loader)
    steps_per_epoch = train_batches.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    dtype = Precision(cfg.train.precision).dtype
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
    divergence = DivergenceWatch(world.device, cfg.train.precision, engine.skipped_steps)
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
                # both heads as one conv, the loss fused on CUDA: one gradient for the conv (models.wsol)
                head_maps = engine(images, merged=True)
                loss = merged_loss(head_maps, labels, train_split.num_classes, objective=objective,
                                   prior=cfg.model.prior)
                divergence.loss(loss, step + 1)
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach().double()
                micro_step += 1
                if micro_step < cfg.train.grad_accum:
                    continue
                # ---- one optimizer step done
                step += 1
                divergence.step_done(engine.skipped_steps, step)
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
                    divergence.check(f"the record of step {step}")
                    entry = _train_record(window, step, steps_per_epoch, step_lrs, cfg, world)
                    if cfg.train.precision == Precision.FP16:
                        entry["fp16_skipped_steps"] = divergence.fp16_skipped  # loss scaling's skips, so far
                    throughput.append(entry["images_per_s"])
                    log.record(entry)
                    window = _Window(time.perf_counter())
                every = cfg.train.checkpoint_every
                paused_from = time.perf_counter()  # checkpoints and validation do not count as training time
                if epoch_end or stop_reason or (every and step % every == 0):
                    divergence.check(f"the checkpoint of step {step}")
                    divergence.check_parameters(engine.module, step)
                    client_state = {"step": step, "epoch": step // steps_per_epoch, **geometry}
                    checkpoint_path = ckpt.save_checkpoint(engine, cfg, world, step, client_state)
                    watchdog.beat(f"checkpoint at step {step}")
                val_every = cfg.train.val_every
                if val_every and ((epoch_end and (step // steps_per_epoch) % val_every == 0) or stop_reason):
                    divergence.check(f"the validation of step {step}")
                    last_val = validate(engine, val_loader, val_split, cfg, world, dtype, watchdog)
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
    """The checkpoint to resume from (None for a fresh run): the newest that verifies on every node.
    Refuses to overwrite a run by accident. Writes the run's config.toml."""
    run_dir = Path(cfg.run_dir)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds checkpoints ({existing.name}); pass --resume to "
                              "continue that run, or choose another run_dir")
    if resume and existing is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_root(run_dir)}")
    if resume:
        existing = ckpt.agree_on_checkpoint(run_dir, world)
        if existing is None:
            raise CheckpointError(f"--resume: no usable checkpoint under {checkpoint_root(run_dir)} (each one "
                                  "fails its manifest: see the lines above)")
    barrier()  # every rank has looked before rank 0 writes anything
    if world.is_main:
        save_config(cfg, run_dir / "config.toml")
    return existing


def synchronise_batchnorm(model: torch.nn.Module, cfg: Config, world_size: int, device_type: str) -> torch.nn.Module:
    """`model` with every BatchNorm replaced by SyncBatchNorm when `model.sync_batchnorm` is set and the
    global batch is split over ranks (world_size > 1): the batch statistics then cover the whole global
    batch, as on the reference's single GPU (CALM.md §3). With one rank, or model.sync_batchnorm = false
    (per-rank statistics over global batch / world size images: less communication, other numbers), the
    model is returned as it is. Gradient accumulation is not covered: each micro-batch is normalised alone.
    """
    if not cfg.model.sync_batchnorm or world_size == 1:
        return model
    if device_type != "cuda":
        raise ConfigError(f"model.sync_batchnorm=true with {world_size} ranks needs CUDA ranks (PyTorch's "
                          "SyncBatchNorm has no CPU path); set model.sync_batchnorm=false for per-rank BatchNorm")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _build_engine(cfg: Config, world: World, num_classes: int, steps_per_epoch: int, total_steps: int):
    """Model, SGD with the two LR groups, LR schedule, all wrapped in a DeepSpeed engine."""
    import deepspeed  # on use, as in _quiet_deepspeed

    model = build_model(cfg.model.backbone, num_classes, cfg.model.method,
                        large_feature_map=cfg.model.large_feature_map, pretrained=cfg.model.pretrained,
                        batch_norm=cfg.model.batch_norm)
    model = synchronise_batchnorm(model, cfg, world.world_size, world.device.type)
    # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm needs both in one dtype.
    model.to(world.device, dtype=Precision(cfg.train.precision).dtype)
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
        raise CheckpointError(f"{folder}: written with {saved}, this run has {geometry}; resume with the same "
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
