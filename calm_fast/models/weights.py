"""The one reader of model weights, in every form calm-fast meets: a plain PyTorch state dict file
(torchvision's ImageNet weights, a DDP or nested save), a file written by `calm-fast train --export`, a
training checkpoint folder (DeepSpeed, ZeRO shards merged to fp32) and a run folder. It also defines the
on-disk names of checkpoints and exported models, which `calm_fast.train.checkpoint` writes.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from calm_fast.config import Config, config_from_dict, load_config

CHECKPOINTS = "checkpoints"
DEEPSPEED_TAG = "ds"
CONFIG_FILE = "config.toml"
EXPORT_FORMAT = "calm-fast-model/1"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_payload(path: str | os.PathLike) -> Any:
    """The contents of a PyTorch file (tensors and plain containers only); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a bad file; all mean "not a checkpoint"
        raise ValueError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from None


def state_dict_of(payload: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: the file itself, or its "state_dict"/"model"/"module" entry,
    with DDP's "module." prefixes removed (`path` names the file in errors)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(payload).__name__}")
    return {_strip_prefix(k): v for k, v in payload.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a plain PyTorch weights file."""
    return state_dict_of(read_payload(path), path)


def consolidate(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(fp32 state dict with ZeRO shards merged, config or None) of a training checkpoint folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    if not (checkpoint / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint}: not a calm-fast checkpoint (no {DEEPSPEED_TAG}/ folder)")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation chatter
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    config_path = checkpoint / CONFIG_FILE
    return dict(state_dict), (load_config(config_path) if config_path.is_file() else None)


def load_exported(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config, int | None]:
    """(state_dict, config, step) of a file written by export_model."""
    return unpack_exported(read_payload(path), path)


def unpack_exported(payload: Any, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config, int | None]:
    """(state_dict, config, step) of the loaded contents of an exported model file (`path` names it in errors)."""
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: not a calm-fast exported model (expected format {EXPORT_FORMAT!r})")
    return payload["state_dict"], config_from_dict(payload["config"]), payload["step"]


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(state dict, config or None) from a checkpoint of any form calm-fast meets.

    Accepted: a run folder (its model.pt, else its newest checkpoint), a training checkpoint folder
    (`checkpoints/step_N`, consolidated from ZeRO shards), a file written by `calm-fast train --export`,
    or a plain PyTorch state dict file (optionally under "state_dict"/"model"/"module", with DDP's
    "module." prefixes).
    """
    path = Path(path)
    if path.is_dir():
        if (path / DEEPSPEED_TAG).is_dir():
            return consolidate(path)
        if (path / "model.pt").is_file():
            return load_weights(path / "model.pt")
        newest = latest_checkpoint(path)
        if newest is not None:
            return consolidate(newest)
        raise FileNotFoundError(f"{path}: neither model.pt, a checkpoint folder nor {CHECKPOINTS}/step_* here")
    payload = read_payload(path)
    if isinstance(payload, dict) and payload.get("format") == EXPORT_FORMAT:
        state_dict, cfg, _ = unpack_exported(payload, path)
        return state_dict, cfg
    return state_dict_of(payload, path), None


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def num_classes_of(state_dict: dict[str, torch.Tensor], source: str | os.PathLike) -> int:
    """The number of classes a checkpoint was trained for: the rows of its class head."""
    weight = state_dict.get("class_head.weight")
    if weight is None:
        raise ValueError(f"{source}: no class_head.weight; set data.num_classes")
    return int(weight.shape[0])
