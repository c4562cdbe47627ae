"""Reading torch files without running code from them: every file calm-fast loads (checkpoints, exported
models, ImageNet weights) goes through `torch.load(weights_only=True)`.

A pickle can name any Python callable, and a full unpickle calls it: a crafted checkpoint could run a
shell command. PyTorch's weights-only unpickler accepts tensors and plain data only, plus the globals
that are allowed explicitly. The allow-list here is the few non-tensor types calm-fast's own checkpoints
hold: numpy's array reconstruction (the numpy RNG state in `trainer_rank*.pt`) and, for DeepSpeed's
files only, its loss scaler, ZeRO stage enum and fragment address (ZeRO optimizer states). Anything else
is refused with a `CheckpointError` naming the file.

DeepSpeed's checkpoint loader and its ZeRO consolidation unpickle fully on their own; `check_torch_files`
loads every file of a DeepSpeed folder this safe way first, so they only ever see files that passed.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_fast.errors import CheckpointError

__all__ = ["safe_torch_load", "check_torch_files"]

_REFUSED = "Weights only load failed"  # how torch's weights-only unpickler starts its refusals


def _numpy_globals() -> list:
    """numpy's array pickling as the numpy RNG state uses it: ndarray, the reconstructor (also under numpy
    1's module name), dtype and the uint32 dtype class of the MT19937 key."""
    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]


def _deepspeed_globals() -> list:
    """The plain-data classes in DeepSpeed's ZeRO optimizer states (checked: ZeRO 1/2, fp32/bf16/fp16)."""
    # Lazy: DeepSpeed is slow to import, and only its own files need these.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, *, deepspeed: bool = False, mmap: bool = False,
                    map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with calm-fast's allow-list (DeepSpeed's classes too when
    `deepspeed`). Raises FileNotFoundError, or CheckpointError naming the file: refused (it holds other
    Python objects) or unreadable (truncated, not a torch file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            if handle.read(1) != b"\x80":  # every pickle since protocol 2, torch's legacy format included
                raise CheckpointError(f"{path}: unreadable as a torch file (neither torch's zip format nor a pickle)")
    allowed = _numpy_globals() + (_deepspeed_globals() if deepspeed else [])
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # A foreign pickle's protocol draws a warning before the refusal; the refusal says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many types for a bad file; each means "not loadable"
        raise CheckpointError(_describe(path, error)) from None


def _describe(path: Path, error: Exception) -> str:
    message = str(error)
    if _REFUSED in message:
        # torch wraps the unpickler's reason (e.g. "Unsupported global: GLOBAL posix.system", "Trying to
        # load unsupported GLOBAL posix.system ...") in advice lines; keep the reason only.
        reason = message.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in message \
            else "\n".join(message.splitlines()[1:])
        detail = next((line.strip() for line in reason.splitlines()
                       if line.strip() and not line.strip().startswith(("Check the documentation", "Please file"))),
                      "unsupported content")
        detail = detail.split(" was not an allowed global")[0].split(" whose module")[0]
        return (f"{path}: refused: it holds Python objects that calm-fast does not load ({detail}); a file "
                "that needs a full unpickle can run code, so only tensors and plain data are read")
    first = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
    return f"{path}: unreadable as a torch file ({type(error).__name__}: {first})"


def check_torch_files(folder: str | os.PathLike, *, deepspeed: bool = True) -> list[Path]:
    """Load every file under `folder` with `safe_torch_load` (memory-mapped where the format allows) and
    return them; raise CheckpointError naming the first that is refused or unreadable."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        safe_torch_load(path, deepspeed=deepspeed, mmap=zipfile.is_zipfile(path))
    return files
