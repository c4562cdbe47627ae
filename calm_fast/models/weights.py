"""The one reader of model weights, in every form calm-fast meets: a plain PyTorch state dict file
(torchvision's ImageNet weights, a DDP or nested save), a file written by `calm-fast train --export`, a
training checkpoint folder (DeepSpeed, ZeRO shards merged to fp32) and a run folder. It also defines the
on-disk names of checkpoints, their manifests and exported models, which `calm_fast.train.checkpoint`
writes, and verifies a checkpoint against its manifests.

Every file is read through `calm_fast.safe_load` (weights only, never a full unpickle); DeepSpeed's files
are checked that way before its ZeRO consolidation, which unpickles fully, reads them. A run folder's
newest checkpoint that fails its manifest is skipped with one line saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from calm_fast.config import Config, config_from_dict, load_config
from calm_fast.errors import CheckpointError
from calm_fast.safe_load import check_torch_files, safe_torch_load

CHECKPOINTS = "checkpoints"
DEEPSPEED_TAG = "ds"
CONFIG_FILE = "config.toml"
EXPORT_FORMAT = "calm-fast-model/1"
MANIFEST_FORMAT = "calm-fast-checkpoint-manifest/1"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
_MANIFEST_PREFIX = "manifest_rank"


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
    """The newest checkpoint folder of a run, verified or not, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------- manifests


def manifest_name(rank: int) -> str:
    return f"{_MANIFEST_PREFIX}{rank:05d}.json"


def is_manifest(name: str) -> bool:
    """A manifest, or an atomic write of one in flight (its hidden temporary file)."""
    return name.startswith((_MANIFEST_PREFIX, f".{_MANIFEST_PREFIX}"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder by its manifests (a file missing, of another size or
    checksum), on one line naming the file; None when it verifies. A folder without a manifest (written
    before calm-fast kept them) has nothing to verify against: None."""
    folder = Path(folder)
    digests: dict[str, str] = {}  # on a shared disk every node's manifest lists every file
    for manifest in sorted(folder.glob(f"{_MANIFEST_PREFIX}*.json")):
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{manifest.name}: unreadable manifest"
        for name, size, sha256 in entries:
            path = folder / name
            if not path.is_file():
                return f"{name}: missing (listed in {manifest.name})"
            actual = path.stat().st_size
            if actual != size:
                return f"{name}: {actual} bytes, {manifest.name} says {size}"
            if digests.setdefault(name, sha256_of(path)) != sha256:
                return f"{name}: checksum differs from {manifest.name}"
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def newest_verified(found: dict[int, Path], upper: int | None, problems: dict[int, str | None], say=_say) -> int:
    """The newest step <= upper (None: any) of `found` whose folder verifies, or -1; each one skipped is
    said once (`problems` remembers the verdicts across calls)."""
    for step in sorted(found, reverse=True):
        if upper is not None and step > upper:
            continue
        if step not in problems:
            problems[step] = checkpoint_problem(found[step])
            if problems[step] is not None:
                say(f"[calm-fast] skipped checkpoint {found[step]}: {problems[step]}")
        if problems[step] is None:
            return step
    return -1


def usable_checkpoint(run_dir: str | os.PathLike, say=_say) -> Path | None:
    """The newest checkpoint of a run that verifies against its manifests (None: none does); each newer
    one is skipped with one line (through `say`) naming its folder and the failed file."""
    found = dict(list_checkpoints(run_dir))
    step = newest_verified(found, None, {}, say)
    return found[step] if step >= 0 else None


# ------------------------------------------------------------------------------------------- reading


def read_payload(path: str | os.PathLike) -> Any:
    """The contents of a PyTorch file (tensors and plain data only: `calm_fast.safe_load`); errors name
    the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return safe_torch_load(path)


def state_dict_of(payload: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: the file itself, or its "state_dict"/"model"/"module" entry,
    with DDP's "module." prefixes removed (`path` names the file in errors)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CheckpointError(f"{path}: expected a state dict (parameter name -> tensor), got {type(payload).__name__}")
    return {_strip_prefix(k): v for k, v in payload.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a plain PyTorch weights file."""
    return state_dict_of(read_payload(path), path)


def consolidate(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(fp32 state dict with ZeRO shards merged, config or None) of a training checkpoint folder."""
    # DeepSpeed on use: slow to import, and only checkpoint folders (not model files) need it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    if not (checkpoint / DEEPSPEED_TAG).is_dir():
        raise FileNotFoundError(f"{checkpoint}: not a calm-fast checkpoint (no {DEEPSPEED_TAG}/ folder)")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint}: {problem}")
    check_torch_files(checkpoint / DEEPSPEED_TAG)  # the consolidation unpickles fully: only files that passed
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
        raise CheckpointError(f"{path}: not a calm-fast exported model (expected format {EXPORT_FORMAT!r})")
    return payload["state_dict"], config_from_dict(payload["config"], source=f"{path} (its config)"), payload["step"]


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
        newest = usable_checkpoint(path)
        if newest is not None:
            return consolidate(newest)
        raise FileNotFoundError(f"{path}: neither model.pt, a checkpoint folder nor a usable "
                                f"{CHECKPOINTS}/step_* here")
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
        raise CheckpointError(f"{source}: no class_head.weight; set data.num_classes")
    return int(weight.shape[0])


def describe_mismatch(given: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], shown: int = 5) -> str:
    """What keeps `given` from loading strictly where `expected` is wanted, on one line ("" when it fits):
    the class count first when the class heads differ, then missing, unexpected and mis-shaped keys."""
    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = [f"{k} (file {list(given[k].shape)}, model {list(expected[k].shape)})"
                 for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = []
    head = "class_head.weight"
    if head in given and head in expected and given[head].shape[0] != expected[head].shape[0]:
        parts.append(f"{given[head].shape[0]} classes in the file, {expected[head].shape[0]} configured")
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            parts.append(f"{title} keys ({len(keys)}): {listed(keys)}")
    return "; ".join(parts)
