"""`calm-fast bench loader` runs end to end at its smallest preset and writes its JSON (no timing asserted)."""

import json

import pytest

from calm_fast import cli
from calm_fast.data.ffcv_loader import ffcv_available


@pytest.mark.slow  # an end-to-end command run
@pytest.mark.skipif(not ffcv_available(), reason="FFCV does not import here")
def test_bench_loader_smoke(tmp_path):
    out = tmp_path / "bench" / "loader.json"
    status = cli.main(["bench", "loader", "--work-dir", str(tmp_path / "work"), "--images", "8", "--image-size", "32",
                       "--input-size", "24", "--resize-size", "28", "--batch-size", "4", "--workers", "1",
                       "--repeats", "1", "--out", str(out)])
    assert status == 0
    results = json.loads(out.read_text())
    assert results["dataset"]["images"] == 8 and results["settings"]["repeats"] == 1
    for mode in ("train", "eval"):
        rates = results["modes"][mode]["images_per_second"]
        assert len(rates["torch"]) == len(rates["ffcv"]) == 1 and min(rates["torch"] + rates["ffcv"]) > 0
    assert not list(out.parent.glob(".*.tmp"))  # written atomically
