"""calm_fast.train.checkpoint and the checkpoint names of calm_fast.models.weights: folder listing and
pruning, RNG capture, atomic saves and exported-model files (saving and resuming whole runs:
test_train_distributed.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from calm_fast.atomic import atomic_torch_save
from calm_fast.models import weights
from calm_fast.train import checkpoint as ckpt


def test_checkpoint_listing_ignores_partial_saves(tmp_path):
    root = weights.checkpoint_root(tmp_path)
    for name in ["step_00000004", "step_00000012", ".tmp-step_00000016", "step_00000008", "notes"]:
        (root / name).mkdir(parents=True)
    (root / "step_00000020").write_text("a file, not a checkpoint")
    assert [s for s, _ in weights.list_checkpoints(tmp_path)] == [4, 8, 12]
    assert weights.latest_checkpoint(tmp_path) == root / "step_00000012"
    ckpt._prune(tmp_path, keep_last=2)
    assert [s for s, _ in weights.list_checkpoints(tmp_path)] == [8, 12]
    assert weights.latest_checkpoint(tmp_path / "nothing") is None


def test_rng_capture_and_restore_round_trip():
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_torch_save_and_load_exported_rejects_foreign_files(tmp_path):
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    with pytest.raises(ValueError, match="not a calm-fast exported model"):
        weights.load_exported(tmp_path / "x.pt")
