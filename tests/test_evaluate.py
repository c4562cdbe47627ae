"""calm_fast.evaluate: the metric wiring against hand-computed results, model and baseline map sources,
checkpoint forms, the `calm-fast eval` command, and 2 ranks (gloo, subprocesses) == 1 rank exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from calm_fast.data.loaders import build_eval_loader
from calm_fast.data.metadata import read_split
from calm_fast.evaluate.job import evaluate_maps, evaluate_model
from calm_fast.evaluate.maps import BaselineMaps, MapBatch, ModelMaps, check_map_kinds
from calm_fast.evaluate.scoring import EvalSettings
from calm_fast.models.weights import load_weights
from calm_fast.models.wsol import build_model_from

NUM_CLASSES = 3
R = 224  # the metric frame
IOUS = (30, 50, 70)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, name="SYNTH", seed=3, num_classes=NUM_CLASSES, sizes={"test": 18}, image_size=64, workers=1)
    return root


@pytest.fixture(scope="module")
def split(data_root):
    return read_split(data_root / "metadata", "SYNTH", "test", data_root / "SYNTH", num_classes=NUM_CLASSES)


def batches(split, order=None, batch_size=5):
    """A loader stand-in: (dummy images, labels, indices) in the given order of sample indices."""
    order = list(range(len(split))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        indices = torch.tensor(order[start:start + batch_size], dtype=torch.int64)
        labels = torch.from_numpy(split.labels[indices.numpy()])
        yield torch.zeros(len(indices), 3, 8, 8), labels, indices


def gt_box_224(split, i) -> tuple[int, int, int, int]:
    """The spec's rescaling, by hand: int(x * 224 / W) per coordinate (one box per synthetic image)."""
    (x0, y0, x1, y1), = split.boxes[i]
    width, height = split.image_sizes[i]
    return int(x0 * R / width), int(y0 * R / height), int(x1 * R / width), int(y1 * R / height)


def box_indicator(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    scoremap = np.zeros((R, R), np.float32)
    scoremap[y0:y1 + 1, x0:x1 + 1] = 1.0
    return scoremap


def oracle_iou(box) -> float:
    """IoU of the GT box with the box the reference finds on its indicator map: one pixel larger on the
    right and bottom (the exclusive end used as inclusive) unless clipped at 223."""
    x0, y0, x1, y1 = box
    px1, py1 = min(x1 + 1, R - 1), min(y1 + 1, R - 1)
    return (x1 - x0 + 1) * (y1 - y0 + 1) / ((px1 - x0 + 1) * (py1 - y0 + 1))


class OracleMaps:
    """Maps equal to the GT box of each image (at 224², so the resize is exact); even-indexed images, or
    all when `every=1`; the others get a constant map. Predicts the true class on even indices."""

    def __init__(self, split, every=2, classify=True):
        self.split, self.every, self.classify = split, every, classify

    def __call__(self, images, labels, indices):
        maps = np.stack([box_indicator(gt_box_224(self.split, int(i))) if int(i) % self.every == 0
                         else np.full((R, R), 0.3, np.float32) for i in indices])
        pred = None
        if self.classify:
            pred = torch.where(indices % 2 == 0, labels, (labels + 1) % NUM_CLASSES)
        return MapBatch(maps={"oracle": maps}, pred_classes=pred)


# -------------------------------------------------------------------- hand-computed metric wiring


def test_oracle_boxes_give_the_hand_computed_box_accuracies(split):
    n = len(split)
    settings = EvalSettings(iou_thresholds=IOUS)
    result = evaluate_maps(OracleMaps(split), split, batches(split), settings).results["oracle"]

    ious = np.array([oracle_iou(gt_box_224(split, i)) for i in range(n)])
    even = np.arange(n) % 2 == 0
    box = result["box"]
    for iou in IOUS:
        # constant maps normalise to zeros -> the box (0,0,0,0), far below IoU 0.3 on these images
        expected = 100.0 * np.sum(even & (ious >= iou / 100)) / n
        assert box["max_box_acc_per_iou"][str(iou)] == pytest.approx(expected, abs=1e-9)
        np.testing.assert_allclose(box["curves"][str(iou)], expected, atol=1e-9)  # flat: masks are 0/255
        # the predicted class is right exactly on the even (oracle) images
        assert box["top1_loc"][str(iou)] == pytest.approx(expected, abs=1e-9)
    assert box["max_box_acc_v2"] == pytest.approx(np.mean(list(box["max_box_acc_per_iou"].values())))
    assert box["max_box_acc"] == pytest.approx(100.0 * np.sum(even & (ious >= 0.5)) / n)
    assert result["cls_top1_acc"] == pytest.approx(100.0 * even.sum() / n)
    assert result["num_images"] == n


def test_pxap_is_pooled_over_the_split_from_the_two_score_levels(split):
    from calm_fast.metrics import load_gt_mask

    settings = EvalSettings(iou_thresholds=IOUS, per_class=False)
    result = evaluate_maps(OracleMaps(split, every=1), split, batches(split), settings).results["oracle"]
    # Scores are 1 inside the GT box and 0 elsewhere, so the PR curve has two points: ">= 1.0" (the box)
    # and ">= 0" (every pixel); PxAP is their right-endpoint step sum over counts pooled across images.
    tp1 = fp1 = positives = negatives = 0
    for i in range(len(split)):
        gt = load_gt_mask(split.masks[i].paths, split.masks[i].ignore_path)
        inside = box_indicator(gt_box_224(split, i)) > 0
        tp1 += np.sum((gt == 1) & inside)
        fp1 += np.sum((gt == 0) & inside)
        positives += np.sum(gt == 1)
        negatives += np.sum(gt == 0)
    recall1 = tp1 / positives
    expected = 100 * (tp1 / (tp1 + fp1) * recall1 + positives / (positives + negatives) * (1 - recall1))
    assert result["mask"]["pxap"] == pytest.approx(expected, rel=1e-12)
    assert "per_class" not in result


def test_constant_maps_score_zero_boxes_and_the_positive_rate_as_pxap(split):
    from calm_fast.metrics import load_gt_mask

    def constant(images, labels, indices):
        return MapBatch(maps={"flat": torch.full((len(indices), 7, 7), 2.5)})

    result = evaluate_maps(constant, split, batches(split), EvalSettings()).results["flat"]
    assert result["box"]["max_box_acc"] == 0 and result["box"]["max_box_acc_v2"] == 0
    assert result["cls_top1_acc"] is None and result["box"]["top1_loc"] is None  # no classifier
    masks = np.stack([load_gt_mask(m.paths, m.ignore_path) for m in split.masks])
    positives, negatives = np.sum(masks == 1), np.sum(masks == 0)
    assert result["mask"]["pxap"] == pytest.approx(100 * positives / (positives + negatives), rel=1e-12)


def test_per_class_rows_add_up_to_the_split(split):
    settings = EvalSettings(iou_thresholds=IOUS)
    # Every map is its GT box; the predicted class is right on even indices only.
    evaluation = evaluate_maps(OracleMaps(split, every=1), split, batches(split), settings)
    result, state = evaluation.results["oracle"], evaluation.state["oracle"]
    rows = result["per_class"]
    labels = split.labels
    n = len(split)
    ious = np.array([oracle_iou(gt_box_224(split, i)) for i in range(n)])
    even = np.arange(n) % 2 == 0
    assert [row["class"] for row in rows] == sorted(set(labels.tolist()))
    for row in rows:
        members = labels == row["class"]
        assert row["num_images"] == members.sum()
        assert row["cls_top1_acc"] == pytest.approx(100 * even[members].mean())
        box_acc = [100 * np.mean(ious[members] >= t / 100) for t in IOUS]
        top1 = [100 * np.mean(even[members] & (ious[members] >= t / 100)) for t in IOUS]
        assert [row[f"box_acc_{t}"] for t in IOUS] == pytest.approx(box_acc)
        assert row["box_acc_v2"] == pytest.approx(np.mean(box_acc))
        assert row["top1_loc_v2"] == pytest.approx(np.mean(top1))
        assert 0 <= row["pxap"] <= 100
    # weighted by class size, the rows give back the split's numbers (the curves are flat here)
    weighted = sum(row["box_acc_v2"] * row["num_images"] for row in rows) / n
    assert weighted == pytest.approx(result["box"]["max_box_acc_v2"])
    weighted_top1 = sum(row["top1_loc_v2"] * row["num_images"] for row in rows) / n
    assert weighted_top1 == pytest.approx(result["box"]["top1_loc_v2"])
    # the per-class pixel histograms partition the split's
    for key in ("positive_hist", "negative_hist"):
        np.testing.assert_array_equal(state[f"class_pixel/{key}"].sum(axis=0), state[f"pixel/{key}"])


def test_batch_order_and_size_do_not_change_the_state(split):
    settings = EvalSettings(iou_thresholds=IOUS)
    first = evaluate_maps(OracleMaps(split), split, batches(split, batch_size=4), settings)
    order = np.random.default_rng(0).permutation(len(split))
    second = evaluate_maps(OracleMaps(split), split, batches(split, order, batch_size=7), settings)
    assert first.state["oracle"].keys() == second.state["oracle"].keys()
    for key, value in first.state["oracle"].items():
        np.testing.assert_array_equal(value, second.state["oracle"][key], err_msg=key)


# ------------------------------------------------------------------------------------ bad input


def test_a_sample_seen_twice_or_never_is_an_error(split):
    n = len(split)
    settings = EvalSettings(per_class=False)
    with pytest.raises(RuntimeError, match=r"sample 0 .* evaluated 2 times"):
        evaluate_maps(OracleMaps(split), split, batches(split, [0, *range(n)]), settings)
    with pytest.raises(RuntimeError, match=r"sample 3 .* evaluated 0 times"):
        evaluate_maps(OracleMaps(split), split, batches(split, [i for i in range(n) if i != 3]), settings)


def test_a_loader_label_that_disagrees_with_the_split_is_an_error(split):
    def wrong_labels():
        for images, labels, indices in batches(split):
            yield images, (labels + 1) % NUM_CLASSES, indices

    with pytest.raises(ValueError, match="differs from class_labels.txt"):
        evaluate_maps(OracleMaps(split), split, wrong_labels(), EvalSettings())


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_map_is_an_error_naming_the_image_not_a_zero_map(split, value):
    class BrokenMaps(OracleMaps):
        def __call__(self, images, labels, indices):
            batch = super().__call__(images, labels, indices)
            maps = batch.maps["oracle"].copy()
            maps[indices.numpy() == 7, 10, 10] = value
            return MapBatch(maps={"oracle": maps}, pred_classes=batch.pred_classes)

    from calm_fast.errors import is_user_error

    with pytest.raises(ValueError) as error:
        evaluate_maps(BrokenMaps(split), split, batches(split), EvalSettings())
    assert is_user_error(error.value)  # `calm-fast eval` prints it as one line, not a traceback
    assert "'oracle' map of sample 7" in str(error.value) and split.image_ids[7] in str(error.value)
    assert "not finite" in str(error.value)


def test_settings_and_map_kinds_are_checked():
    with pytest.raises(ValueError, match="cam_curve_interval"):
        EvalSettings(cam_curve_interval=1.0)
    for bad in ((0, 50), (100,), (0.5,), ()):
        with pytest.raises(ValueError, match="iou_thresholds must be integer percents in"):
            EvalSettings(iou_thresholds=bad)
    with pytest.raises(ValueError, match="needs a CALM model"):
        check_map_kinds(("joint",), "cam")
    with pytest.raises(ValueError, match="expected one of"):
        check_map_kinds(("heat",), "calm-em")


# ------------------------------------------------------------------------------------- map sources


class FixedHead(torch.nn.Module):
    """A 'model' whose outputs are fixed tensors (ignores the images)."""

    def __init__(self, class_logits, location_scores):
        super().__init__()
        self.class_logits, self.location_scores = class_logits, location_scores
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, images):
        return self.class_logits, self.location_scores


def test_model_maps_are_those_of_the_ground_truth_class_not_the_predicted_one():
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(4, NUM_CLASSES, 5, 5, generator=generator)
    location = torch.randn(4, 1, 5, 5, generator=generator)
    class_logits[:, 2] += 3.0  # every image is predicted as class 2 ...
    labels = torch.tensor([0, 1, 0, 1])  # ... but labelled otherwise
    source = ModelMaps(FixedHead(class_logits, location), "calm-em", ("class", "joint", "prior"))
    batch = source(torch.zeros(4, 3, 8, 8), labels, torch.arange(4))
    assert batch.pred_classes.tolist() == [2, 2, 2, 2]
    for i, label in enumerate(labels.tolist()):
        torch.testing.assert_close(batch.maps["class"][i], class_logits[i, label])
        # joint p(y, z | x) = softmax_K(S)[y] * relu(a) / Σ relu(a), by hand
        prior = torch.relu(location[i, 0]) / torch.relu(location[i, 0]).sum()
        expected = torch.softmax(class_logits[i], dim=0)[label] * prior
        torch.testing.assert_close(batch.maps["joint"][i], expected)
        torch.testing.assert_close(batch.maps["prior"][i], prior)


def test_cam_predicts_from_the_average_of_its_class_map():
    class_logits = torch.zeros(2, NUM_CLASSES, 4, 4)
    class_logits[0, 1, 0, 0] = 10.0  # one strong cell: GAP 10/16 for class 1
    class_logits[0, 2] = 1.0  # everywhere 1: GAP 1 for class 2, the larger average
    class_logits[1, 0, 2, 2] = 5.0
    source = ModelMaps(FixedHead(class_logits, None), "cam", ("class",))
    batch = source(torch.zeros(2, 3, 8, 8), torch.tensor([1, 0]), torch.arange(2))
    assert batch.pred_classes.tolist() == [2, 0]
    torch.testing.assert_close(batch.maps["class"], class_logits[[0, 1], [1, 0]])


def test_baseline_maps_are_class_agnostic():
    from calm_fast.evaluate import baselines
    from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD

    pixels = torch.randint(0, 256, (2, 3, 16, 16)).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = (pixels - mean) / std  # as the loader gives them
    source = BaselineMaps(("centre-gaussian", "image-energy"))
    batch = source(images, torch.tensor([0, 1]), torch.tensor([5, 6]))
    assert batch.pred_classes is None
    np.testing.assert_allclose(batch.maps["centre-gaussian"][1], baselines.centre_gaussian_map(16, 16))
    original = (pixels[1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(batch.maps["image-energy"][1], baselines.image_energy_map(original), rtol=1e-5)
    with pytest.raises(ValueError, match="baseline 'noise'"):
        BaselineMaps(("noise",))


# ------------------------------------------------------------------------------------- checkpoints


def _tiny_model(method="calm-em"):
    from calm_fast.models import build_model

    torch.manual_seed(0)
    return build_model("tiny_resnet", NUM_CLASSES, method, large_feature_map=True)


def test_load_weights_accepts_plain_nested_and_exported_files(tmp_path):
    from calm_fast.models.weights import EXPORT_FORMAT
    from calm_fast.config import config_to_dict, load_config

    state = _tiny_model().state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    torch.save({"state_dict": state}, tmp_path / "nested.pt")
    cfg = load_config(None, ["model.backbone=tiny_resnet"])
    torch.save({"format": EXPORT_FORMAT, "state_dict": state, "config": config_to_dict(cfg), "step": 7},
               tmp_path / "model.pt")
    for name in ("ddp.pt", "nested.pt", "model.pt"):
        loaded, saved_cfg = load_weights(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        assert (saved_cfg is not None) == (name == "model.pt")
    loaded, saved_cfg = load_weights(tmp_path)  # a run folder: its model.pt
    assert saved_cfg.model.backbone == "tiny_resnet"

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_weights(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_weights(tmp_path / "absent.pt")
    cfg_wrong = load_config(None, ["model.backbone=tiny_vgg"])
    with pytest.raises(ValueError, match="does not fit model.backbone='tiny_vgg'"):
        build_model_from(cfg_wrong, NUM_CLASSES, state)


def test_evaluate_model_gives_headline_numbers_and_restores_the_mode(split, data_root):
    from calm_fast.config import load_config

    cfg = load_config(None, [f"data.root={json.dumps(str(data_root))}", "data.dataset=SYNTH", "data.input_size=64",
                             "data.resize_size=64", "data.workers=0", "model.backbone=tiny_resnet",
                             "eval.batch_size=8"])
    model = _tiny_model()
    model.train()
    out = evaluate_model(model, split, cfg)
    assert model.training
    assert out["map_kind"] == "joint" and out["num_images"] == len(split)
    for key in ("cls_top1_acc", "max_box_acc", "max_box_acc_v2", "top1_loc", "pxap"):
        assert isinstance(out[key], float) and 0 <= out[key] <= 100
    assert out["max_box_acc_v2"] == out["maps"]["joint"]["box"]["max_box_acc_v2"]


# --------------------------------------------------------------------- the command, 1 and 2 ranks


LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def experiment(data_root, tmp_path_factory):
    """A config for the synthetic set and a randomly initialised tiny CALM model in two checkpoint forms."""
    from calm_fast.models.weights import EXPORT_FORMAT
    from calm_fast.config import config_to_dict, load_config

    folder = tmp_path_factory.mktemp("experiment")
    text = f"""run_dir = {json.dumps(str(folder / "run"))}
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
batch_size = 4
"""
    (folder / "config.toml").write_text(text)
    state = _tiny_model().state_dict()
    torch.save(state, folder / "weights.pt")
    exported = {"format": EXPORT_FORMAT, "state_dict": state,
                "config": config_to_dict(load_config(folder / "config.toml")), "step": 1}
    torch.save(exported, folder / "model.pt")
    return folder


def _run_in_process(monkeypatch, argv):
    from calm_fast import cli
    from calm_fast.distributed import free_port

    for name, value in zip(LAUNCHER, ("0", "0", "1", "1", "127.0.0.1", str(free_port()))):
        monkeypatch.setenv(name, value)  # a world of one, restored after the test
    return cli.main(argv)


def _state(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "metric_state.npz") as loaded:
        return {key: loaded[key] for key in loaded.files}


@pytest.mark.slow
def test_two_gloo_ranks_give_exactly_the_one_rank_result(experiment, monkeypatch):
    one, two = experiment / "one", experiment / "two"
    # The model's float output can change in the last bits with the CPU thread count and the batch's
    # composition, which can move a pixel across a histogram edge: one thread and one image per batch
    # in every process, so the ranks compute exactly the one-process maps.
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        # One rank, in this process, from the exported file (its own config).
        code = _run_in_process(monkeypatch, ["eval", "--checkpoint", str(experiment / "model.pt"), "--map-kind",
                                             "all", "--out", str(one), "--save-maps", "--overlays", "4",
                                             "eval.batch_size=1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0

    # Two ranks as subprocesses (what deepspeed/torchrun would start), from the plain state dict.
    from calm_fast.distributed import free_port

    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-m", "calm_fast.cli", "eval", "--config", str(experiment / "config.toml"),
                   "--checkpoint", str(experiment / "weights.pt"), "--map-kind", "all", "--out", str(two),
                   "--save-maps", "--overlays", "4", "eval.batch_size=1"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]

    state_one, state_two = _state(one), _state(two)
    assert state_one.keys() == state_two.keys()
    for key in state_one:
        np.testing.assert_array_equal(state_one[key], state_two[key], err_msg=key)
    results_one = json.loads((one / "results.json").read_text())
    results_two = json.loads((two / "results.json").read_text())
    assert results_one["maps"] == results_two["maps"]
    assert set(results_one["maps"]) == {"joint", "posterior", "prior", "class"}
    assert results_two["world_size"] == 2
    assert results_two["command"].startswith("calm-fast eval ") and "eval.batch_size=1" in results_two["command"]

    # Every report file is there, and nothing half-written is left.
    for kind in results_one["maps"]:
        for name in (f"boxacc_{kind}.png", f"pr_{kind}.png", f"overlays_{kind}.png", f"per_class_{kind}.csv"):
            assert (one / name).is_file() and (two / name).is_file(), name
    assert not [p for p in list(one.rglob("*")) + list(two.rglob("*")) if p.name.endswith(".tmp")]

    # The saved maps of the two ranks are the one-rank maps, split by index.
    with np.load(one / "maps" / "rank00000.npz") as single:
        order = np.argsort(single["indices"])
        reference = {key: single[key][order] for key in single.files}
    parts = [np.load(two / "maps" / f"rank{r:05d}.npz") for r in range(2)]
    indices = np.concatenate([p["indices"] for p in parts])
    assert sorted(indices.tolist()) == list(range(len(reference["indices"])))
    assert set(parts[0]["indices"].tolist()) == set(range(0, len(indices), 2))  # rank r: r, r+W, ...
    order = np.argsort(indices)
    for key in ("map_joint", "map_class", "labels", "pred_classes"):
        merged = np.concatenate([p[key] for p in parts])[order]
        np.testing.assert_array_equal(merged, reference[key], err_msg=key)


@pytest.mark.slow  # `calm-fast eval` end to end (a process group, the report files)
def test_baselines_through_the_command(experiment, monkeypatch):
    out = experiment / "baselines"
    code = _run_in_process(monkeypatch, ["eval", "--config", str(experiment / "config.toml"), "--baseline",
                                         "centre-gaussian", "image-energy", "--out", str(out), "--overlays", "2",
                                         "--no-per-class"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["source"] == "baseline" and set(results["maps"]) == {"centre-gaussian", "image-energy"}
    for metrics in results["maps"].values():
        assert metrics["cls_top1_acc"] is None and metrics["box"]["top1_loc"] is None
        assert 0 <= metrics["box"]["max_box_acc_v2"] <= 100 and 0 <= metrics["mask"]["pxap"] <= 100
        assert "per_class" not in metrics
    assert (out / "overlays_image-energy.png").is_file()


def test_command_errors_name_what_is_wrong(experiment, monkeypatch, capsys):
    code = _run_in_process(monkeypatch, ["eval", "--config", str(experiment / "config.toml"),
                                         "--checkpoint", str(experiment / "weights.pt"), "--map-kind", "heat"])
    assert code == 2 and "map kind 'heat'" in capsys.readouterr().err
    code = _run_in_process(monkeypatch, ["eval", "--config", str(experiment / "config.toml")])
    assert code == 2 and "nothing to evaluate" in capsys.readouterr().err
    code = _run_in_process(monkeypatch, ["eval", "--checkpoint", str(experiment / "weights.pt")])
    assert code == 2 and "holds no config" in capsys.readouterr().err


@pytest.mark.slow  # an end-to-end command run
def test_ffcv_and_torch_loaders_feed_the_same_samples(split, data_root, tmp_path):
    from calm_fast.config import load_config
    from calm_fast.data import ffcv_convert, ffcv_loader

    if not ffcv_loader.ffcv_available():
        pytest.skip("FFCV does not import here")
    ffcv_convert.convert_split(split, ffcv_convert.beton_path_for(tmp_path, "SYNTH", "test"), num_workers=1)
    base = [f"data.root={json.dumps(str(data_root))}", "data.dataset=SYNTH", "data.input_size=32",
            f"data.beton_dir={json.dumps(str(tmp_path))}", "data.workers=1", "eval.batch_size=4"]
    states = {}
    for kind in ("ffcv", "torch"):
        cfg = load_config(None, base + [f"data.eval_loader={kind}"])
        shards = [build_eval_loader(cfg, split, rank, 2) for rank in range(2)]
        assert isinstance(shards[0], ffcv_loader.FFCVLoader) == (kind == "ffcv")
        seen = [int(i) for shard in shards for _, _, indices in shard for i in indices]
        assert sorted(seen) == list(range(len(split)))  # every sample once across the two ranks
        loader = build_eval_loader(cfg, split)
        states[kind] = evaluate_maps(OracleMaps(split), split, loader, EvalSettings()).state
    for key, value in states["torch"]["oracle"].items():
        np.testing.assert_array_equal(states["ffcv"]["oracle"][key], value, err_msg=key)
    # "auto" takes the .beton while it matches the metadata
    auto = load_config(None, base + ["data.eval_loader=auto"])
    assert isinstance(build_eval_loader(auto, split), ffcv_loader.FFCVLoader)
    # By default evaluation reads the original files (the reference's pixels), whatever training reads.
    default = load_config(None, base + ["data.loader=ffcv"])
    assert default.data.eval_loader == "torch"
    assert isinstance(build_eval_loader(default, split), torch.utils.data.DataLoader)


@pytest.mark.slow  # `calm-fast eval` end to end
def test_a_run_folder_is_evaluated_into_itself(experiment, monkeypatch):
    # experiment/ holds config.toml and model.pt as a training run leaves them
    code = _run_in_process(monkeypatch, ["eval", "--run", str(experiment), "--overlays", "0", "--no-per-class"])
    assert code == 0
    results = json.loads((experiment / "eval" / "test" / "results.json").read_text())
    assert results["checkpoint"] == str(experiment) and set(results["maps"]) == {"joint"}
    assert not list((experiment / "eval" / "test").glob("overlays_*"))


@pytest.mark.slow
def test_a_frozen_rank_ends_the_eval_job_within_the_watchdog_time(experiment, tmp_path):
    """Two gloo ranks; rank 1 freezes on its first batch. With dist.watchdog_minutes=0.05 (3 s) both ranks
    must stop within seconds, not after the process-group timeout (dist.timeout_minutes=10)."""
    from calm_fast.distributed import free_port

    frozen = tmp_path / "frozen"
    script = (
        "import os, sys, time\n"
        "from calm_fast.evaluate import maps\n"
        "def freeze(self, images, labels, indices):\n"
        f"    open({str(frozen)!r}, 'w').close()\n"
        "    time.sleep(3600)\n"
        "if os.environ['RANK'] == '1':\n"
        "    maps.BaselineMaps.__call__ = freeze\n"
        "from calm_fast.cli import main\n"
        f"sys.exit(main(['eval', '--config', {str(experiment / 'config.toml')!r}, 'dist.watchdog_minutes=0.05',\n"
        f"               'dist.timeout_minutes=10', '--baseline', 'centre-gaussian', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.monotonic() + 180
        while not frozen.exists():
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-2000:] for p in procs]
            assert time.monotonic() < deadline, "rank 1 never reached its first batch"
            time.sleep(0.05)
        frozen_at = time.monotonic()
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(1.0, frozen_at + 30 - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail("the eval job still runs 30 s after a rank froze")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert all(proc.returncode != 0 for proc in procs)
    assert "rank 1: no progress" in outputs[1], outputs[1][-2000:]
