"""`calm-fast bench train --compare heads` on CPU: it runs a training step per head and writes its JSON."""

import json

from calm_fast import cli


def test_bench_train_heads_smoke_on_cpu(tmp_path):
    out = tmp_path / "heads.json"
    status = cli.main(["bench", "train", "--compare", "heads", "--heads-device", "cpu", "--presets",
                       "tiny_resnet:32:4", "--precision", "fp32", "--classes", "7", "--steps", "1", "--no-compile",
                       "--out", str(out)])
    results = json.loads(out.read_text())
    assert status == 0 and results["repeats"] == 3
    rows = {row["variant"]: row for row in results["results"]}
    assert set(rows) == {"cam", "calm-em eager"}  # the fused head is GPU-only, the compiled one switched off
    assert rows["cam"]["vs_cam"] == 1.0
    for row in rows.values():
        assert (row["backbone"], row["pixels"], row["map"], row["batch"]) == ("tiny_resnet", 32, 4, 4)
        assert len(row["runs"]) == 3 and all(rate > 0 for rate in row["runs"])
        paired = sorted(run / cam for run, cam in zip(row["runs"], rows["cam"]["runs"]))
        assert row["vs_cam"] == paired[1]  # the median of the per-repeat ratios
