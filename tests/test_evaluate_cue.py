"""Cue localization inside the evaluation job: the same numbers as the benchmark fed directly, one forward
pass per image for WSOL and cue together, the command's options and errors, and 2 gloo ranks == 1 rank
exactly for every benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calm_fast.data.cue_truth import SyntheticCueTruth
from calm_fast.data.metadata import read_split
from calm_fast.evaluate.attribution.cue import CueLocalization
from calm_fast.evaluate.job import evaluate_maps
from calm_fast.evaluate.maps import BaselineMaps, ModelMaps
from calm_fast.evaluate.scoring import EvalSettings
from calm_fast.head import all_class_maps

NUM_CLASSES = 8
LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, name="SYNTH", seed=5, num_classes=NUM_CLASSES, sizes={"test": 24}, image_size=48, workers=1)
    return root


@pytest.fixture(scope="module")
def split(data_root):
    return read_split(data_root / "metadata", "SYNTH", "test", data_root / "SYNTH", num_classes=NUM_CLASSES)


class CountingHead(torch.nn.Module):
    """Fixed per-image head outputs looked up by a code in the images; counts the images it is run on."""

    def __init__(self, count: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.class_logits = torch.randn(count, NUM_CLASSES, 6, 6, generator=generator)
        self.location = torch.randn(count, 1, 6, 6, generator=generator)
        self.images_seen = 0

    def forward(self, images):
        self.images_seen += len(images)
        index = images[:, 0, 0, 0].long()  # the batches below carry each sample's index here
        return self.class_logits[index], self.location[index]


def batches(split, order, batch_size=5):
    for start in range(0, len(order), batch_size):
        indices = torch.tensor(order[start:start + batch_size])
        images = torch.zeros(len(indices), 3, 4, 4)
        images[:, 0, 0, 0] = indices.float()
        yield images, torch.from_numpy(split.labels[indices.numpy()]), indices


def test_the_job_gives_the_direct_numbers_with_one_forward_pass(split):
    truth = SyntheticCueTruth(split)
    head = CountingHead(len(split))
    source = ModelMaps(head, "calm-em", ("joint",), class_map_kinds=("joint", "class"))
    cue = CueLocalization(truth, ["joint", "class"], overlay_count=3)
    order = list(range(len(split)))[::-1]
    evaluation = evaluate_maps(source, split, batches(split, order), EvalSettings(), cue=cue)
    assert head.images_seen == len(split)  # WSOL and cue from the same single pass
    assert evaluation.cost["forward_passes_per_image"] == 1.0
    assert set(evaluation.cost["benchmarks"]) == {"wsol", "cue"}
    assert set(evaluation.results) == {"joint"} and evaluation.results["joint"]["box"] is not None

    direct = CueLocalization(truth, ["joint", "class"])
    for start in range(0, len(split), 7):
        index = torch.arange(start, min(start + 7, len(split)))
        maps = {kind: all_class_maps(head.class_logits[index], head.location[index], kind) for kind in ("joint", "class")}
        direct.update(maps, split.labels[index.numpy()], index)
    for key, value in direct.state().items():
        np.testing.assert_array_equal(evaluation.state["cue"][key], value, err_msg=key)
    assert evaluation.cue.results() == direct.results()
    assert {index for index, _ in evaluation.cue.overlays} == {0, 1, 2}

    only_cue = evaluate_maps(source, split, batches(split, order), EvalSettings(wsol=False),
                             cue=CueLocalization(truth, ["joint", "class"]))
    assert only_cue.results == {} and set(only_cue.cost["benchmarks"]) == {"cue"}
    for key, value in direct.state().items():
        np.testing.assert_array_equal(only_cue.state["cue"][key], value, err_msg=key)


def test_a_source_without_class_maps_cannot_feed_cue_localization(split):
    cue = CueLocalization(SyntheticCueTruth(split), ["joint"])
    with pytest.raises(ValueError, match="every class's map"):
        evaluate_maps(BaselineMaps(("centre-gaussian",)), split, batches(split, range(len(split))), cue=cue)


# --------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def experiment(data_root, tmp_path_factory):
    from calm_fast.models import build_model

    folder = tmp_path_factory.mktemp("experiment")
    (folder / "config.toml").write_text(f"""run_dir = {json.dumps(str(folder / "run"))}
[data]
root = {json.dumps(str(data_root))}
dataset = "SYNTH"
num_classes = {NUM_CLASSES}
input_size = 64
resize_size = 64
workers = 0
loader = "torch"
[model]
backbone = "tiny_resnet"
method = "calm-em"
[eval]
split = "test"
batch_size = 1
""")
    torch.manual_seed(0)
    torch.save(build_model("tiny_resnet", NUM_CLASSES, "calm-em", large_feature_map=True).state_dict(),
               folder / "weights.pt")
    return folder


def _run_in_process(monkeypatch, argv):
    from calm_fast import cli
    from calm_fast.distributed import free_port

    for name, value in zip(LAUNCHER, ("0", "0", "1", "1", "127.0.0.1", str(free_port()))):
        monkeypatch.setenv(name, value)
    return cli.main(argv)


def test_command_errors_for_cue_name_what_is_wrong(experiment, monkeypatch, capsys):
    config = str(experiment / "config.toml")
    code = _run_in_process(monkeypatch, ["eval", "--config", config, "--baseline", "centre-gaussian",
                                         "--benchmark", "cue"])
    assert code == 2 and "class-agnostic baselines" in capsys.readouterr().err
    code = _run_in_process(monkeypatch, ["eval", "--config", config, "--checkpoint", str(experiment / "weights.pt"),
                                         "--benchmark", "cue", "--map-kind", "prior"])
    assert code == 2 and "per-class map" in capsys.readouterr().err
    code = _run_in_process(monkeypatch, ["eval", "--config", config, "eval.benchmarks=[\"cue\", \"saliency\"]",
                                         "--checkpoint", str(experiment / "weights.pt")])
    assert code == 2 and "eval.benchmarks='saliency'" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end command run
def test_cue_with_remove_classify_puts_both_in_results_and_headline(experiment, tmp_path, monkeypatch):
    out = tmp_path / "cue-rk"
    code = _run_in_process(monkeypatch, ["eval", "--config", str(experiment / "config.toml"), "--checkpoint",
                                         str(experiment / "weights.pt"), "--benchmark", "cue", "remove-classify",
                                         "--map-kind", "joint", "--control", "random", "--attribution-images", "4",
                                         "--overlays", "0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmarks"] == ["cue", "remove-classify"] and results["maps"] == {}  # no WSOL asked
    assert set(results["cost"]["benchmarks"]) == {"cue"} and results["remove_classify"]["num_images"] == 4
    assert set(results["remove_classify"]["maps"]) == {"joint", "control-random"}
    headline, cue = results["headline"], results["cue"]["maps"]["joint"]
    expected = {f"cue_pxap_g{group}": values["mean_pxap"] for group, values in cue["groups"].items()
                if values["mean_pxap"] is not None}
    expected["cue_pxap_mean"] = cue["mean_pxap"]
    assert {"cue_pxap_g1", "cue_pxap_mean"} <= set(expected)
    assert {key: headline["joint"][key] for key in headline["joint"] if key.startswith("cue_")} == expected
    for k, r_k in zip(results["remove_classify"]["ks"], results["remove_classify"]["maps"]["joint"]["r_k"]):
        assert headline["joint"].get(f"r_{k}") == r_k
    assert not any(key.startswith("cue_") for key in headline["control-random"])
    assert headline["remove-classify"]["clean_accuracy"] == results["remove_classify"]["clean_accuracy"]


def _state(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "metric_state.npz") as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.mark.slow
def test_two_gloo_ranks_give_exactly_the_one_rank_wsol_and_cue_results(experiment, monkeypatch):
    one, two = experiment / "one", experiment / "two"
    arguments = ["--config", str(experiment / "config.toml"), "--checkpoint", str(experiment / "weights.pt"),
                 "--benchmark", "wsol", "cue", "--map-kind", "joint", "class", "--overlays", "2"]
    # One thread and one image per batch everywhere, so every process computes exactly the same maps.
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        assert _run_in_process(monkeypatch, ["eval", *arguments, "--out", str(one)]) == 0
    finally:
        torch.set_num_threads(threads)

    from calm_fast.distributed import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-m", "calm_fast.cli", "eval", *arguments, "--out", str(two)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    state_one, state_two = _state(one), _state(two)
    assert state_one.keys() == state_two.keys()
    assert any(key.startswith("cue/joint/") for key in state_one) and any(key.startswith("cue/class/") for key in state_one)
    for key in state_one:
        np.testing.assert_array_equal(state_one[key], state_two[key], err_msg=key)
    results_one = json.loads((one / "results.json").read_text())
    results_two = json.loads((two / "results.json").read_text())
    assert results_one["maps"] == results_two["maps"] and results_one["cue"] == results_two["cue"]
    assert results_one["cue"]["group_counts"] == {"1": 12, "2": 12, "3": 4}
    assert results_one["benchmarks"] == ["wsol", "cue"] and results_two["world_size"] == 2
    for results in (results_one, results_two):
        assert results["cost"]["forward_passes_per_image"] == 1.0
        assert set(results["cost"]["benchmarks"]) == {"wsol", "cue"}
        assert "cumulative" in results["cue"]["maps"]["joint"]
    for name in ("cue_joint.png", "cue_class.png", "overlays_joint.png"):
        assert (one / name).is_file() and (two / name).is_file(), name


def test_bench_cue_smallest_run_writes_its_numbers(tmp_path):
    from calm_fast import cli

    out = tmp_path / "cue.json"
    code = cli.main(["bench", "cue", "--data", str(tmp_path / "data"), "--images", "16", "--repeats", "1",
                     "--workers", "0", "--batch-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == (0 if result["meets_target"] else 1)
    assert result["images"] == 16 and result["pairs"] == 28 and result["forward_passes_per_image"] == 1.0
    assert len(result["seconds"]["plain"]) == len(result["seconds"]["cue"]) == 1
    assert result["ratio"] == pytest.approx(result["median_seconds"]["cue"] / result["median_seconds"]["plain"])
