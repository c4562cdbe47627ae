"""The README's main job end to end, tiny: synthetic data -> FFCV -> train CALM-EM and CAM -> eval -> comparison."""

import json
import os
import subprocess
import sys

import pytest

from calm_fast.data.synthetic import generate

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_reports_an_honest_verdict(tmp_path):
    data = tmp_path / "data"
    generate(data, name="SYNTH", seed=3, sizes={"train": 48, "val": 16, "test": 24}, image_size=64, workers=0)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "calm_fast.cli", "demo", "--data", str(data), "--run", str(run),
               "data.input_size=64", "data.resize_size=72", "data.batch_size=16", "eval.batch_size=24",
               "data.workers=0", "train.max_steps=2", "train.max_minutes=2"]
    done = subprocess.run(command, cwd=os.getcwd(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((run / "demo.json").read_text())
    rows = summary["rows"]
    assert set(rows) == {"calm-em (joint map)", "cam (class map)", "centre-gaussian baseline",
                         "image-energy baseline"}
    for name, values in rows.items():
        assert 0 <= values["max_box_acc_v2"] <= 100, name
    # the models classify (accuracy reported), the baselines do not
    assert "cls_top1_acc" in rows["calm-em (joint map)"] and "cls_top1_acc" not in rows["image-energy baseline"]
    # the verdict follows from the numbers, recomputed here from the rule in the README
    calm = rows["calm-em (joint map)"]["max_box_acc_v2"]
    baselines = [rows["centre-gaussian baseline"]["max_box_acc_v2"], rows["image-energy baseline"]["max_box_acc_v2"]]
    expected = calm >= max(baselines) + 15 and max(baselines) <= 35
    assert summary["target"]["met"] == expected
    for method in ("calm-em", "cam"):
        assert json.loads((run / method / "summary.json").read_text())["loader"] == "ffcv"  # convert -> FFCV
        assert (run / method / "model.pt").exists()
        assert (run / method / "eval" / "test" / "results.json").exists()
    assert "target" in done.stdout and "MaxBoxAccV2" in done.stdout

    # a second run reuses data and models and only re-evaluates
    again = subprocess.run(command, cwd=os.getcwd(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained" in again.stdout
