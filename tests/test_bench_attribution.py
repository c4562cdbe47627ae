"""`calm-fast bench attribution` runs end to end on its smallest preset and writes its JSON (no timing asserted)."""

import json

from calm_fast.cli import build_parser


def test_bench_attribution_smallest_preset(tmp_path):
    out = tmp_path / "bench" / "attribution.json"
    args = build_parser().parse_args(["bench", "attribution", "--preset", "smallest", "--device", "cpu",
                                      "--gradient-methods", "vanilla", "all", "--out", str(out)])
    assert args._main(args) == 0
    results = json.loads(out.read_text())
    removal = results["remove_classify"]
    assert removal["images"] == 2 and removal["model_inputs"] == 2 * 11  # clean + 5 random + 5 top
    assert removal["forward_s"] > 0 and removal["overhead"] >= 0
    methods = results["gradients"]["methods"]
    assert set(methods) == {"vanilla", "all"}
    assert methods["vanilla"]["inputs_per_image"] == 1
    assert methods["all"]["inputs_per_image"] == (3 + 1) + 4  # smallest preset: 3 IG steps, 4 samples
    for entry in methods.values():
        assert entry["images_per_s"] > 0 and entry["bound_images_per_s"] > 0
    assert results["clock"] == "cpu"
    assert not list(out.parent.glob(".*.tmp"))  # written atomically
