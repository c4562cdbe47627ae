"""The optimiser side of training: the SGD optimiser with its two learning-rate groups (CALM.md §3), the
LR schedule (step decay per epoch, at the plain or at the reference's timing, or cosine; all with linear
warm-up) and the DeepSpeed config built from the TOML's batch geometry, precision, ZeRO stage and clipping
over an optional DeepSpeed JSON that holds the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from calm_fast.config import Config, ConfigError
from calm_fast.modes import Schedule


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


def lr_factor(step: int, cfg: Config, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the initial LRs for optimizer step `step` (0-based).

    step: ×lr_decay_factor after every lr_decay_frequency full epochs. step_reference: the same, one epoch
    earlier, as the reference decays (at the start of epoch k·f counted from 1; `Schedule`). cosine: from 1
    down to min_lr_ratio over the steps after warm-up. All: linear warm-up (step+1)/warmup_steps first.
    """
    optim = cfg.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule in (Schedule.STEP, Schedule.STEP_REFERENCE):
        epoch = step // steps_per_epoch
        # The reference calls its decay with the 1-based number of the epoch about to start.
        decay_clock = epoch + 1 if optim.schedule == Schedule.STEP_REFERENCE else epoch
        return optim.lr_decay_factor ** (decay_clock // optim.lr_decay_frequency)
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
