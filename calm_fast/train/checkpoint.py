"""Training checkpoints: atomic, resumable, pruned to the last k, and exportable to a plain state dict.

Layout of a run folder:

    <run_dir>/checkpoints/step_00001200/
        ds/                      DeepSpeed's files: module weights, (ZeRO-sharded) optimizer, LR scheduler,
                                 and our client state (step, epoch, batch geometry)
        trainer_rank00000.pt     per-rank RNG states (python, numpy, torch, CUDA)
        config.toml              the config that wrote it
        manifest_rank00000.json  size and SHA-256 of every file above (one per node, by its first rank)
    <run_dir>/model.pt           consolidated fp32 state dict for evaluation (export_model)

Atomicity: every rank writes into `.tmp-step_N/`; after a barrier each node's first rank writes the
manifest of what it sees there, and after another the folder is renamed to `step_N` (one rename per node,
so node-local disks work as well as shared ones). A folder named `step_N` is therefore complete when
written; a killed save leaves only a `.tmp-*` folder, which the next save removes. Damage after the save
(a truncated copy, a full disk, bit rot) shows in the manifest: resuming takes the newest checkpoint that
verifies on every node and says which ones it skipped and why. Resuming needs every rank's files, so on
several nodes `run_dir` should be on a shared file system.

Every file is read through `calm_fast.safe_load` (weights only, never a full unpickle), DeepSpeed's
files included: they are checked before DeepSpeed's own loader or consolidation reads them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_fast.atomic import atomic_torch_save, atomic_write_text
from calm_fast.config import Config, config_to_dict, save_config
from calm_fast.distributed import World, all_reduce_sum, barrier
from calm_fast.models.weights import (CONFIG_FILE, DEEPSPEED_TAG, EXPORT_FORMAT, MANIFEST_FORMAT, STEP_DIR,
                                      checkpoint_root, consolidate, is_manifest, list_checkpoints, manifest_name,
                                      newest_verified, sha256_of, step_dir_name)
from calm_fast.safe_load import check_torch_files, safe_torch_load


def trainer_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ RNG state


def capture_rng() -> dict[str, Any]:
    """Every RNG state this process uses (python, numpy, torch CPU, CUDA devices)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- save / load


def save_checkpoint(engine, cfg: Config, world: World, step: int, client_state: dict[str, Any]) -> Path:
    """Save the engine (weights, optimizer, scheduler), `client_state` and this rank's RNG states as the
    checkpoint of `step`, atomically, then keep only the newest `cfg.train.keep_last`. Collective."""
    root = checkpoint_root(cfg.run_dir)
    final = root / step_dir_name(step)
    staging = root / f".tmp-{final.name}"
    if world.is_local_main:
        # Leftovers of a killed save, or a checkpoint of this step that a resumed run is about to redo.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, client_state=client_state, save_latest=False)
    torch.save({"rank": world.rank, "rng": capture_rng()}, staging / trainer_file(world.rank))
    if world.is_main:
        save_config(cfg, staging / CONFIG_FILE)
    barrier()
    if world.is_local_main:
        write_manifest(staging, world.rank)
    barrier()
    if world.is_local_main:
        try:
            os.replace(staging, final)
        except FileNotFoundError:
            if not final.is_dir():  # on a shared disk another node's rename got there first; anything else
                raise
        _prune(cfg.run_dir, cfg.train.keep_last)
    barrier()
    return final


def _prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    for _, folder in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(engine, folder: Path, world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights, optimizer and scheduler into `engine`; return (client state, this rank's trainer
    state with its RNG states). Collective."""
    folder = Path(folder)
    own = folder / trainer_file(world.rank)
    if not own.is_file():
        raise FileNotFoundError(f"{own}: missing; was {folder} written by a run with a different number of "
                                f"ranks? (this run has {world.world_size})")
    trainer_state = safe_torch_load(own)
    check_torch_files(folder / DEEPSPEED_TAG)  # DeepSpeed's loader unpickles fully: only files that passed
    load_path, client_state = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"{folder}/{DEEPSPEED_TAG}: DeepSpeed found no checkpoint to load")
    return client_state, trainer_state


# ------------------------------------------------------------------------------------------- manifests


def write_manifest(folder: str | os.PathLike, rank: int) -> Path:
    """Write `manifest_rank<rank>.json` in a checkpoint folder: size and SHA-256 of every file in it
    (other manifests excepted), atomically; `models.weights.checkpoint_problem` verifies it."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not is_manifest(p.name)):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n"
    return atomic_write_text(folder / manifest_name(rank), text)


def agree_on_checkpoint(run_dir: str | os.PathLike, world: World) -> Path | None:
    """Collective `models.weights.usable_checkpoint`: the newest step that is present and verifies on every
    node (each node's first rank checks its own view: node-local disks may differ after a killed save)."""
    found = {step: folder for step, folder in list_checkpoints(run_dir)}
    problems: dict[int, str | None] = {}
    unconstrained = -2
    upper = None
    while True:
        choice = newest_verified(found, upper, problems) if world.is_local_main else unconstrained
        choices = torch.zeros(world.world_size, dtype=torch.int64)
        choices[world.rank] = choice
        constrained = [c for c in all_reduce_sum(choices).tolist() if c != unconstrained]
        agreed = min(constrained)
        if agreed < 0:
            return None
        if max(constrained) == agreed:
            return checkpoint_root(run_dir) / step_dir_name(agreed)
        upper = agreed  # some node lacks the newer ones: every node looks again at or below this step


# ---------------------------------------------------------------------------------------------- export


def export_model(checkpoint: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Consolidate a checkpoint's weights (ZeRO shards included) into one fp32 state dict file.

    The file holds {"format", "state_dict" (keys of WSOLModel.state_dict()), "config" (plain dict),
    "step"}; read it with `load_exported`. Written atomically.
    """
    checkpoint = Path(checkpoint)
    state_dict, cfg = consolidate(checkpoint)
    if cfg is None:
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG_FILE}; an exported model carries its config")
    match = STEP_DIR.match(checkpoint.name)
    payload = {"format": EXPORT_FORMAT, "state_dict": state_dict, "config": config_to_dict(cfg),
               "step": int(match.group(1)) if match else None}
    return atomic_torch_save(payload, out_path)


