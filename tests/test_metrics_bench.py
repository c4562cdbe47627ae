"""`calm-fast bench metrics` runs end to end on a tiny problem and writes its JSON (no timing asserted)."""

import argparse
import json

import numpy as np

from calm_fast.bench import metrics as bench_metrics


def test_bench_metrics_smoke(tmp_path):
    parser = argparse.ArgumentParser()
    bench_metrics.add_arguments(parser)
    out = tmp_path / "bench" / "metrics.json"
    args = parser.parse_args(["--maps", "2", "--reference-maps", "1", "--repeats", "1", "--intervals", "0.05",
                              "--kinds", "realistic", "--out", str(out)])
    assert bench_metrics.main(args) == 0
    results = json.loads(out.read_text())
    assert {(case["kind"], case["mode"]) for case in results["box"]} == {("realistic", "v2"), ("realistic", "v1")}
    for case in results["box"]:
        assert case["identical_to_opencv"] and case["reference_maps"] == 1
        assert all(rate > 0 for rate in case["maps_per_second"].values())
    assert results["pxap"]["0.05"]["identical_to_reference"]
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no temporary file left


def test_bench_map_kinds_are_valid_scoremaps():
    rng = np.random.default_rng(0)
    for kind, make in bench_metrics.MAKERS.items():
        maps = make(rng, 4)
        assert maps.shape == (4, 224, 224) and maps.dtype == np.float64, kind
        assert maps.min() >= 0.0 and maps.max() <= 1.0, kind
        boxes = bench_metrics.gt_boxes_for(rng, maps)
        assert all(b.shape[1] == 4 and (b[:, 2:] >= b[:, :2]).all() for b in boxes), kind
