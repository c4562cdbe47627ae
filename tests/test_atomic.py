"""calm_fast.atomic: JSON without NaN, file modes, no temporary file left, the old file kept when the
rename fails, npz and torch round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from calm_fast import atomic


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_json_turns_numpy_and_nan_into_plain_json(tmp_path):
    data = {"a": np.float64(1.5), "b": np.int64(3), "c": np.array([0.5, np.nan, np.inf]), "d": [np.bool_(True)],
            "e": {1: float("nan")}, "f": None}
    path = atomic.write_json(tmp_path / "r.json", data)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": 1.5, "b": 3, "c": [0.5, None, None], "d": [True], "e": {"1": None}, "f": None}
    assert _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not owner-only


def test_atomic_write_keeps_the_old_file_when_the_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_json(target, {"new": 1})
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_save_npz_round_trip(tmp_path):
    maps = np.random.default_rng(0).random((3, 7, 7)).astype(np.float32)
    path = atomic.save_npz(tmp_path / "sub" / "maps.npz", maps=maps, indices=np.array([4, 1, 9]))
    with np.load(path) as loaded:
        np.testing.assert_array_equal(loaded["maps"], maps)
        np.testing.assert_array_equal(loaded["indices"], [4, 1, 9])


def test_atomic_text_and_torch_save(tmp_path):
    assert atomic.atomic_write_text(tmp_path / "a" / "t.txt", "é\n").read_text(encoding="utf-8") == "é\n"
    path = atomic.atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []
