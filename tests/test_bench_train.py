"""`calm-fast bench train` runs end to end at its smallest preset (one rank, two steps of a tiny net on a
tiny synthetic set) and writes its JSON (no timing asserted)."""

import json
from pathlib import Path

import pytest

from calm_fast import cli

pytestmark = pytest.mark.slow  # a training subprocess (DeepSpeed start-up): end to end
REPO = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench" / "train.json"
    status = cli.main(["bench", "train", "-c", str(REPO / "configs" / "synthetic.toml"),
                       "--data", str(tmp_path / "data"), "--images", "16", "--ranks", "1", "--steps", "2", "--out", str(out),
                       "data.input_size=32", "data.resize_size=36", "data.batch_size=8", "data.workers=0",
                       "data.loader=torch", "train.precision=fp32", "train.tensorboard=false"])
    assert status == 0
    results = json.loads(out.read_text())
    assert results["steps"] == 2 and results["input_size"] == 32 and results["global_batch"] == 8
    assert results["results"]["1"]["images_per_s"] > 0 and results["results"]["1"]["ratio"] == 1.0
