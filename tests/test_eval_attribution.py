"""The attribution benchmarks wired into `calm-fast eval`: flags, results.json sections and headline, the
R_k table's plot, gradient maps scored by the WSOL metrics, the subset option, and 2 ranks (gloo,
subprocesses) == 1 rank exactly. The definitions themselves are pinned in test_remove_classify.py and
test_gradients.py; here the command's numbers are checked against the library called directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from calm_fast.data.metadata import read_split
from calm_fast.evaluate.attribution.gradients import GradientSettings, gradient_maps
from calm_fast.evaluate.attribution.model_fns import model_classifier, model_score
from calm_fast.evaluate.attribution.remove_classify import remove_and_classify
from calm_fast.evaluate.headline import headline_numbers
from calm_fast.evaluate.job import evaluate_maps
from calm_fast.evaluate.maps import MapBatch
from calm_fast.evaluate.scoring import EvalSettings
from calm_fast.metrics.remove_classify import RemoveClassifyCounts

NUM_CLASSES = 3
LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SMALL_GRADIENTS = ["--ig-steps", "2", "--smooth-samples", "2"]  # few samples: the wiring, not the method


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, name="SYNTH", seed=3, num_classes=NUM_CLASSES, sizes={"test": 12}, image_size=64, workers=1)
    return root


@pytest.fixture(scope="module")
def split(data_root):
    return read_split(data_root / "metadata", "SYNTH", "test", data_root / "SYNTH", num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def experiment(data_root, tmp_path_factory):
    """A config for the synthetic set and a randomly initialised tiny CAM model (exported and plain)."""
    from calm_fast.config import config_to_dict, load_config
    from calm_fast.models import build_model
    from calm_fast.models.weights import EXPORT_FORMAT

    folder = tmp_path_factory.mktemp("experiment")
    text = f"""run_dir = {json.dumps(str(folder / "run"))}
[data]
root = {json.dumps(str(data_root))}
dataset = "SYNTH"
num_classes = {NUM_CLASSES}
input_size = 32
resize_size = 32
workers = 0
loader = "torch"
[model]
backbone = "tiny_resnet"
method = "cam"
[eval]
split = "test"
batch_size = 4
"""
    (folder / "config.toml").write_text(text)
    cfg = load_config(folder / "config.toml")
    torch.manual_seed(0)
    model = build_model("tiny_resnet", NUM_CLASSES, "cam", large_feature_map=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    torch.save({"format": EXPORT_FORMAT, "state_dict": model.state_dict(), "config": config_to_dict(cfg),
                "step": 1}, folder / "model.pt")
    return folder


def _model(experiment):
    from calm_fast.config import load_config
    from calm_fast.models.weights import load_weights
    from calm_fast.models.wsol import build_model_from

    state, _ = load_weights(experiment / "weights.pt")
    return build_model_from(load_config(experiment / "config.toml"), NUM_CLASSES, state).eval()


def _batches(experiment, split, count=None):
    """The evaluation loader's batches as the command sees them (same batch size: the model's float output
    can change in its last bits with the batch's composition), cut to the first `count` images."""
    from calm_fast.config import load_config
    from calm_fast.data.loaders import build_eval_loader

    out = []
    for images, labels, indices in build_eval_loader(load_config(experiment / "config.toml"), split):
        keep = indices < (count or len(split))
        if keep.any():
            out.append((images[keep], labels[keep], indices[keep]))
    return out


def _cli(monkeypatch, argv):
    from calm_fast import cli
    from calm_fast.distributed import free_port

    for name, value in zip(LAUNCHER, ("0", "0", "1", "1", "127.0.0.1", str(free_port()))):
        monkeypatch.setenv(name, value)
    return cli.main(argv)


def _state(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "metric_state.npz") as loaded:
        return {key: loaded[key] for key in loaded.files}


# ------------------------------------------------------------------------------------------- flags


def test_flags_parse_and_bad_names_are_refused(capsys):
    from calm_fast.cli import build_parser

    args = build_parser().parse_args(["eval", "--run", "r", "--benchmark", "wsol", "remove-classify", "--gradient",
                                      "vanilla", "ig-reference", "integrated-gradients", "smoothgrad", "vargrad",
                                      "--control", "centre-gaussian", "random", "blurred-cam",
                                      "--attribution-images", "100", "--ig-steps", "10", "--smooth-samples", "8"])
    assert args.benchmark == ["wsol", "remove-classify"]
    assert args.gradient == ["vanilla", "ig-reference", "integrated-gradients", "smoothgrad", "vargrad"]
    assert args.control == ["centre-gaussian", "random", "blurred-cam"]
    assert (args.attribution_images, args.ig_steps, args.smooth_samples) == (100, 10, 8)
    defaults = build_parser().parse_args(["eval", "--run", "r"])
    assert defaults.benchmark is None and defaults.gradient == [] and defaults.control == []
    assert (defaults.ig_steps, defaults.smooth_samples) == (50, 50)  # the reference's settings
    for bad in (["--benchmark", "cues"], ["--gradient", "gradcam"], ["--control", "noise"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "--run", "r", *bad])
        assert "invalid choice" in capsys.readouterr().err


def test_command_errors_name_what_is_wrong(experiment, monkeypatch, capsys):
    base = ["eval", "--config", str(experiment / "config.toml")]
    assert _cli(monkeypatch, base + ["--baseline", "centre-gaussian", "--benchmark", "remove-classify"]) == 2
    assert "need a model" in capsys.readouterr().err
    assert _cli(monkeypatch, base + ["--checkpoint", str(experiment / "weights.pt"), "--attribution-images",
                                     "0", "--benchmark", "remove-classify"]) == 2
    assert "at least one image" in capsys.readouterr().err
    assert _cli(monkeypatch, base + ["--checkpoint", str(experiment / "weights.pt"), "eval.benchmarks=[\"box\"]"]) == 2
    assert "eval.benchmarks" in capsys.readouterr().err
    assert _cli(monkeypatch, base + ["--checkpoint", str(experiment / "weights.pt"), "--benchmark", "cue",
                                     "--control", "random"]) == 2
    assert "no class-agnostic control" in capsys.readouterr().err


# ------------------------------------------------------------------- one process: sections and numbers


@pytest.fixture(scope="module")
def full_run(experiment, tmp_path_factory):
    """One in-process run with every section: WSOL + remove-and-classify, two gradients, three controls."""
    out = tmp_path_factory.mktemp("full")
    mp = pytest.MonkeyPatch()
    try:
        code = _cli(mp, ["eval", "--config", str(experiment / "config.toml"), "--checkpoint",
                         str(experiment / "weights.pt"), "--benchmark", "wsol", "remove-classify", "--gradient",
                         "vanilla", "vargrad", "--control", "centre-gaussian", "random", "blurred-cam",
                         *SMALL_GRADIENTS, "--overlays", "2", "--out", str(out)])
    finally:
        mp.undo()
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


SOURCES = ["class", "grad-vanilla", "grad-vargrad", "control-centre-gaussian", "control-random", "control-blurred-cam"]


@pytest.mark.slow  # an end-to-end command run
def test_results_have_a_section_per_benchmark(full_run):
    out, results = full_run
    assert results["benchmarks"] == ["wsol", "remove-classify"]
    section = results["remove_classify"]
    assert list(section["maps"]) == SOURCES
    assert section["ks"] == [10, 30, 50, 70, 90] and section["num_images"] == results["num_images"] == 12
    # R_k is the ratio of the summed counts in metric_state.npz (an independent read of the same state)
    state = _state(out)
    top, random = state["remove_classify/top_correct"], state["remove_classify/random_correct"]
    for row, name in enumerate(SOURCES):
        expected = [t / r if r else None for t, r in zip(top[row], random)]
        assert section["maps"][name]["r_k"] == pytest.approx(expected)
    assert section["clean_accuracy"] == pytest.approx(100 * state["remove_classify/clean_correct"] / 12)
    assert section["clean_accuracy"] == pytest.approx(results["maps"]["class"]["cls_top1_acc"])
    # cost recorded per benchmark: the gradients' forward+backward passes per image are the plan's
    cost = results["attribution"]["cost"]
    assert results["gradients"]["cost"]["forward_backward_passes_per_image"] == 1 + 2  # x itself; 2 noisy samples
    assert results["remove_classify"]["cost"]["extra_forward_passes_per_image"] == 5 * (1 + len(SOURCES))
    assert cost["forward_passes_per_image"]["maps"] == 1
    for part in ("gradients", "remove_classify"):
        assert results[part]["cost"]["images_per_second"] > 0
    assert (out / "remove_classify.png").stat().st_size > 0
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow  # reads the end-to-end command run above
def test_gradient_and_control_maps_are_scored_by_wsol(full_run):
    out, results = full_run
    assert list(results["maps"]) == SOURCES
    for name in SOURCES[1:]:
        metrics = results["maps"][name]
        assert 0 <= metrics["box"]["max_box_acc_v2"] <= 100 and 0 <= metrics["mask"]["pxap"] <= 100
        assert (out / f"boxacc_{name}.png").is_file() and (out / f"overlays_{name}.png").is_file()


@pytest.mark.slow  # reads the end-to-end command run above
def test_the_headline_holds_numbers_per_map_source(full_run):
    _, results = full_run
    headline = results["headline"]
    for name in SOURCES:
        row = headline[name]
        assert row["max_box_acc_v2"] == results["maps"][name]["box"]["max_box_acc_v2"]
        for k, r_k in zip((10, 30, 50, 70, 90), results["remove_classify"]["maps"][name]["r_k"]):
            assert row.get(f"r_{k}") == r_k  # absent exactly where R_k is undefined
    assert headline["remove-classify"]["clean_accuracy"] == results["remove_classify"]["clean_accuracy"]
    numbers = [v for row in headline.values() for v in row.values()]
    assert all(isinstance(v, float) for v in numbers)


@pytest.mark.slow  # an end-to-end command run
def test_a_gradient_map_scored_by_the_command_equals_the_library_called_directly(full_run, experiment, split):
    out, _ = full_run
    model = _model(experiment)
    settings = GradientSettings(ig_steps=2, smooth_samples=2, seed=0)

    def source(images, labels, indices):
        maps = gradient_maps(model_score(model, "cam"), images, labels, indices, ["vanilla"], settings)
        predicted = model_classifier(model, "cam")(images).argmax(dim=1)
        return MapBatch(maps={"grad-vanilla": maps["vanilla"]}, pred_classes=predicted)

    direct = evaluate_maps(source, split, _batches(experiment, split), EvalSettings())
    state = _state(out)
    assert {f"grad-vanilla/{key}" for key in direct.state["grad-vanilla"]} <= set(state)
    for key, value in direct.state["grad-vanilla"].items():
        np.testing.assert_array_equal(state[f"grad-vanilla/{key}"], value, err_msg=key)


@pytest.mark.slow  # an end-to-end command run
def test_remove_classify_on_a_subset_equals_the_library_on_those_images(experiment, split, tmp_path, monkeypatch):
    out = tmp_path / "subset"
    code = _cli(monkeypatch, ["eval", "--config", str(experiment / "config.toml"), "--checkpoint",
                              str(experiment / "weights.pt"), "--benchmark", "remove-classify", "--gradient",
                              "vanilla", "--control", "random", *SMALL_GRADIENTS, "--attribution-images", "7",
                              "--out", str(out), "--overlays", "0"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["maps"] == {} and results["remove_classify"]["num_images"] == 7
    assert results["attribution"]["num_images"] == 7 and "grad-vanilla" not in results["maps"]
    # The library on the first 7 images, classifying the clean images itself.
    from calm_fast.evaluate.attribution.controls import random_maps
    from calm_fast.head import attribution_map

    model = _model(experiment)
    counts = RemoveClassifyCounts(["class", "grad-vanilla", "control-random"])
    for images, labels, indices in _batches(experiment, split, 7):
        grads = gradient_maps(model_score(model, "cam"), images, labels, indices, ["vanilla"],
                              GradientSettings(ig_steps=2, smooth_samples=2))
        with torch.no_grad():
            class_logits, location = model(images)
        maps = {"class": attribution_map(class_logits, location, labels, "class"), "grad-vanilla": grads["vanilla"],
                "control-random": random_maps(indices.tolist(), tuple(images.shape[2:]), seed=0)}
        remove_and_classify(model_classifier(model, "cam"), images, labels, indices, maps, counts, seed=0)
    state = _state(out)
    for key, value in counts.state_dict().items():
        np.testing.assert_array_equal(state[f"remove_classify/{key}"], value, err_msg=key)


@pytest.mark.slow  # an end-to-end command run
def test_wsol_with_gradients_and_no_remove_classify(experiment, tmp_path, monkeypatch):
    out = tmp_path / "wsol"
    code = _cli(monkeypatch, ["eval", "--config", str(experiment / "config.toml"), "--checkpoint",
                              str(experiment / "weights.pt"), "--gradient", "ig-reference", *SMALL_GRADIENTS,
                              "--out", str(out), "--overlays", "0", "--no-per-class"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["maps"]) == {"class", "grad-ig-reference"} and "remove_classify" not in results
    assert results["gradients"]["methods"] == ["ig-reference"] and not (out / "remove_classify.png").exists()
    assert set(results["headline"]) == {"class", "grad-ig-reference"}


# ------------------------------------------------------------------------------------------- headline


def test_headline_numbers_from_hand_made_results():
    results = {
        "maps": {"joint": {"cls_top1_acc": 90.0, "box": {"max_box_acc_v2": 61.5}, "mask": {"pxap": None}}},
        "cue": {"maps": {"joint": {"groups": {1: {"mean_pxap": 30.0}, "2": {"mean_pxap": None}},
                                   "mean_pxap": 31.25}}},
        "remove_classify": {"ks": [10, 90], "clean_accuracy": 80.0, "random_accuracy": [75.0, 0.0],
                            "maps": {"joint": {"r_k": [0.5, None]}, "grad-vanilla": {"r_k": [1.25, None]}}},
    }
    assert headline_numbers(results) == {
        "joint": {"cls_top1_acc": 90.0, "max_box_acc_v2": 61.5, "cue_pxap_g1": 30.0, "cue_pxap_mean": 31.25,
                  "r_10": 0.5},
        "grad-vanilla": {"r_10": 1.25},
        "remove-classify": {"clean_accuracy": 80.0, "random_accuracy_10": 75.0, "random_accuracy_90": 0.0},
    }


def test_seeds_summary_reads_the_headline(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import seeds
    finally:
        sys.path.pop(0)
    args = seeds.parse_args(["--out", str(tmp_path), "--runs", "cam:bf16", "--seeds", "0", "1"])
    for seed, (box, r_10) in enumerate([(50.0, 0.25), (60.0, 0.75)]):
        folder = tmp_path / seeds.run_name("cam:bf16", seed) / "eval" / "test"
        folder.mkdir(parents=True)
        headline = {"class": {"max_box_acc_v2": box, "r_10": r_10}}
        (folder / "results.json").write_text(json.dumps({"headline": headline, "maps": {"class": {"x": 1.0}},
                                                         "command": f"calm-fast eval --seed-{seed}"}))
    # --method-eval-args adds arguments to one method's evaluations only
    both = seeds.parse_args(["--out", str(tmp_path / "x"), "--runs", "cam:bf16", "calm-em:bf16", "--seeds", "0",
                             "--eval-args", "--benchmark wsol remove-classify",
                             "--method-eval-args", "cam=--gradient vanilla smoothgrad"])
    argv = {name: job for name, job, _ in seeds.eval_jobs(both, tmp_path / "x")}
    assert argv["cam-bf16-seed0"][-6:] == ["--benchmark", "wsol", "remove-classify", "--gradient", "vanilla",
                                           "smoothgrad"]
    assert argv["calm-em-bf16-seed0"][-3:] == ["--benchmark", "wsol", "remove-classify"]
    with pytest.raises(SystemExit, match="METHOD=ARGS"):
        seeds.method_eval_args(seeds.parse_args(["--method-eval-args", "--gradient vanilla"]))

    summary = seeds.summarise(args, tmp_path)
    assert summary["commands"] == {"cam-bf16-seed0": "calm-fast eval --seed-0", "cam-bf16-seed1": "calm-fast eval --seed-1"}
    table = summary["table"]["cam:bf16"]
    assert set(table) == {"class.max_box_acc_v2", "class.r_10"}
    assert table["class.max_box_acc_v2"]["mean"] == 55.0 and table["class.r_10"]["min"] == 0.25
    assert table["class.max_box_acc_v2"]["std"] == pytest.approx(np.std([50.0, 60.0], ddof=1))


# ------------------------------------------------------------------------------------- 2 ranks == 1


@pytest.mark.slow
def test_two_gloo_ranks_give_exactly_the_one_rank_result(experiment, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    options = ["--benchmark", "wsol", "remove-classify", "cue", "--gradient", "vanilla", "smoothgrad", "--control",
               "random", "blurred-cam", *SMALL_GRADIENTS, "--attribution-images", "9", "--overlays", "2",
               "eval.batch_size=1"]
    # One thread and one image per batch everywhere, so the ranks compute exactly the one-process maps.
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        code = _cli(monkeypatch, ["eval", "--checkpoint", str(experiment / "model.pt"), "--out", str(one), *options])
    finally:
        torch.set_num_threads(threads)
    assert code == 0

    from calm_fast.distributed import free_port

    port, procs, outputs = str(free_port()), [], []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-m", "calm_fast.cli", "eval", "--config", str(experiment / "config.toml"),
                   "--checkpoint", str(experiment / "weights.pt"), "--out", str(two), *options]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    state_one, state_two = _state(one), _state(two)
    assert state_one.keys() == state_two.keys()
    assert "remove_classify/top_correct" in state_one and any(k.startswith("grad-smoothgrad/") for k in state_one)
    for key in state_one:
        np.testing.assert_array_equal(state_one[key], state_two[key], err_msg=key)
    results_one = json.loads((one / "results.json").read_text())
    results_two = json.loads((two / "results.json").read_text())
    for section in ("maps", "remove_classify", "cue", "headline"):
        if section in ("remove_classify", "cue"):
            strip = lambda s: {k: v for k, v in s.items() if "cost" not in k}  # noqa: E731 - timings differ
            assert strip(results_one[section]) == strip(results_two[section])
        else:
            assert results_one[section] == results_two[section], section
    assert results_two["world_size"] == 2 and results_two["remove_classify"]["num_images"] == 9
    assert set(results_one["maps"]) == {"class", "grad-vanilla", "grad-smoothgrad", "control-random",
                                        "control-blurred-cam"}
    # cue localization: the model's map on all 12 images, the class-dependent extra maps on the first 9
    cue = results_one["cue"]
    assert {name: cue["maps"][name]["num_images"] for name in cue["maps"]} == {
        "class": 12, "grad-vanilla": 9, "grad-smoothgrad": 9, "control-blurred-cam": 9}
    assert set(cue["excluded"]) == {"control-random"} and "control-random/images_fed" not in state_one
    assert state_one["cue/grad-smoothgrad/images_fed"] == 9
    for name in ("grad-vanilla", "grad-smoothgrad", "control-blurred-cam"):
        assert results_one["headline"][name].get("cue_pxap_mean") == cue["maps"][name]["mean_pxap"]
        assert (one / f"cue_{name}.png").is_file()
    # every image needs its class and both partners here (3 classes, one pair per group): 3 classes x 3 inputs
    for results in (results_one, results_two):
        assert results["cue"]["attribution_cost"]["forward_backward_passes_per_image"] == 3 * (1 + 2)
        assert results["attribution"]["cost"]["gradients"]["classes_per_image"] == 3


def test_series_table_and_plot(tmp_path):
    from rich.console import Console

    from calm_fast import report

    table = report.series_table("R_k", ["R_10", "R_90"], {"joint": [0.125, None], "grad-vanilla": [1.0, 0.5]})
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.12" in text and "–" in text and "grad-vanilla" in text and "0.50" in text
    with pytest.raises(ValueError, match="2 columns"):
        report.series_table("R_k", ["R_10", "R_90"], {"joint": [0.1]})
    path = report.plot_series(tmp_path / "curves.png", [10, 90], {"joint": [0.1, None]}, "k", "R_k", "t", reference=1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no series"):
        report.plot_series(tmp_path / "none.png", [10], {}, "k", "R_k", "t")
