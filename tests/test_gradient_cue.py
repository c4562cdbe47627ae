"""Cue localization of gradient maps (CALM.md §4, the published gradient rows): on a hand-made synthetic
layout, a linear CAM model whose input gradient per class is known in closed form, so every per-class
gradient map, every pair's |map_y1 - map_y2| and its PxAP are computed by hand; the subset option; the
controls left out; the sparse class rows against the dense maps they stand for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cue_localization import write_hand_synthetic  # the 3-class, 2-image layout with exact part masks

from calm_fast.data.cue_truth import SyntheticCueTruth
from calm_fast.evaluate.attribution.benchmarks import (
    AttributionOptions,
    attribution_sections,
    cue_map_names,
    merge_into,
    rows_of_classes,
    run_attribution,
)
from calm_fast.evaluate.attribution.cue import ClassMapRows, CueLocalization
from calm_fast.evaluate.attribution.gradients import GradientSettings, samples_per_image
from calm_fast.evaluate.reports import cue_overlay_items
from calm_fast.evaluate.scoring import EvalSettings

R = 224
# 224-frame regions of the layout: body 6000 px, head 400 px, tail 400 px (its differing parts), and a
# background patch of 400 px that belongs to no part.
BODY, HEAD, TAIL = (slice(80, 140), slice(60, 160)), (slice(40, 60), slice(160, 180)), (slice(90, 110), slice(20, 40))
PATCH = (slice(190, 210), slice(190, 210))


def hand_gradient_maps() -> torch.Tensor:
    """A_c = max over RGB of |∂s_c/∂x| of the linear model below: class 0 nothing; class 1 the head at 0.5
    and the body at 1; class 2 the tail and the background patch at 1."""
    maps = torch.zeros(3, R, R)
    maps[1][HEAD], maps[1][BODY] = 0.5, 1.0
    maps[2][TAIL], maps[2][PATCH] = 1.0, 1.0
    return maps


class LinearCam(torch.nn.Module):
    """A CAM model with 1x1 class maps S_c = <W_c, x> + b_c, so s_c = GAP(S_c) has ∂s_c/∂x = W_c; W_c is
    A_c on red, -A_c / 2 on green and 0 on blue, so max over RGB of |W_c| is A_c."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        weight = torch.stack([maps, -maps / 2, torch.zeros_like(maps)], dim=1)  # [K, 3, R, R]
        self.weight = torch.nn.Parameter(weight.flatten(1))
        self.bias = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0]))

    def forward(self, images):
        logits = torch.nn.functional.linear(images.flatten(1), self.weight, self.bias)
        return logits[:, :, None, None], torch.zeros(len(images), 1, 1, 1)


def by_hand() -> dict[tuple[int, int], float | None]:
    """PxAP (percent) of each pair of the layout for the maps above (both images: image 0 of class 0, image 1
    of class 1; min-max normalisation is the identity here: every row spans 0 .. 1; zeros are dropped)."""
    return {
        # images 0 and 1: positives the head, 2 x 400 at 0.5; negatives the body, 2 x 6000 at 1.
        # At 1: precision 0, recall 0; at 0.5: precision 800 / 12800, recall 1.
        (0, 1): 100 * 800 / 12800,
        # image 0: positives the tail, 400 at 1; negatives the patch, 400 at 1.
        (0, 2): 100 * 400 / 800,
        # image 1: positives head 400 at 0.5 and tail 400 at 1; negatives body 6000 and patch 400 at 1.
        # At 1: precision 400 / 6800, recall 1/2; at 0.5: precision 800 / 7200, recall 1.
        (1, 2): 100 * (0.5 * 400 / 6800 + 0.5 * 800 / 7200),
    }


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    split = write_hand_synthetic(tmp_path_factory.mktemp("hand"))
    images = torch.randn(2, 3, R, R, generator=torch.Generator().manual_seed(4))
    return split, images


def _run(layout, options: AttributionOptions, batch_size: int = 2):
    split, images = layout
    truth = SyntheticCueTruth(split)
    cue = CueLocalization(truth, cue_map_names(options))
    calls = []
    model = LinearCam(hand_gradient_maps())
    original = model.forward

    def counted(x):
        calls.append(len(x))
        return original(x)

    model.forward = counted
    labels = torch.from_numpy(split.labels)
    loader = [(images[i:i + batch_size], labels[i:i + batch_size], torch.arange(i, min(i + batch_size, 2)))
              for i in range(0, 2, batch_size)]
    attribution = run_attribution(model, "cam", ("class",), "relu", split, loader, options, EvalSettings(), cue=cue)
    return attribution, calls


METHODS = ("vanilla", "ig-reference", "smoothgrad", "vargrad")


def test_gradient_cue_pxap_of_a_linear_model_by_hand(layout):
    # both images in one batch; 5 inputs per forward, so a chunk mixes classes and images
    settings = GradientSettings(ig_steps=1, smooth_samples=2, max_batch=5)
    options = AttributionOptions(remove_classify=False, wsol=False, cue=True, gradients=METHODS,
                                 controls=("centre-gaussian", "random"), gradient=settings)
    attribution, calls = _run(layout, options)
    results = merge_into(None, attribution, 2).cue.results()
    expected = by_hand()
    assert list(results["maps"]) == [f"grad-{m}" for m in METHODS]
    for method in ("vanilla", "ig-reference", "smoothgrad"):  # the gradient is constant: all three are A_c
        computed = results["maps"][f"grad-{method}"]
        assert computed["num_images"] == 2 and computed["normalization"] == "minmax"
        pxap = {tuple(pair["classes"]): pair["pxap"] for pair in computed["pairs"]}
        assert pxap == pytest.approx(expected, rel=1e-6), method
        assert computed["groups"][1]["mean_pxap"] == pytest.approx((expected[0, 1] + expected[0, 2]) / 2)
        assert computed["mean_pxap"] == pytest.approx(sum(expected.values()) / 3)
    # VarGrad of a constant gradient is zero for every class: no pixel scores, PxAP undefined everywhere.
    assert results["maps"]["grad-vargrad"]["mean_pxap"] is None
    assert set(results["excluded"]) == {"control-centre-gaussian", "control-random"}
    # Each image needs its class and its partners' (here all 3), every sample of every method in shared rows.
    per_class = samples_per_image(METHODS, settings)
    cost = attribution.cost
    assert cost["gradients"]["classes_per_image"] == 3
    assert cost["gradients"]["forward_backward_passes_per_image"] == 3 * per_class
    assert sum(calls) == 2 * (1 + 3 * per_class)  # one clean forward pass per image, then the gradients
    assert cost["cue"]["forward_backward_passes_per_image"] == 3 * per_class and cost["cue"]["images_per_second"] > 0
    section = attribution_sections(attribution)["attribution"]["cue"]
    assert section["maps"] == [f"grad-{m}" for m in METHODS] and set(section["excluded"]) == set(results["excluded"])


def test_gradient_cue_on_the_first_image_only(layout):
    options = AttributionOptions(remove_classify=False, wsol=False, cue=True, gradients=("vanilla",), images=1,
                                 gradient=GradientSettings(ig_steps=1, smooth_samples=1))
    attribution, _ = _run(layout, options)
    computed = attribution.cue.results()["maps"]["grad-vanilla"]
    pxap = {tuple(pair["classes"]): pair["pxap"] for pair in computed["pairs"]}
    # image 0 (class 0) alone: (0,1) positives 400 head at 0.5, negatives 6000 body at 1; (1,2) has no image.
    assert pxap == pytest.approx({(0, 1): 100 * 400 / 6400, (0, 2): 50.0, (1, 2): None})
    assert computed["num_images"] == 1 and attribution.num_images == 1


def test_class_rows_score_as_the_dense_maps_they_stand_for(layout):
    split, _ = layout
    truth = SyntheticCueTruth(split)
    dense = torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    labels, indices = torch.tensor([0, 1]), torch.tensor([0, 1])
    full, sparse = CueLocalization(truth, ["m"], overlay_count=2), CueLocalization(truth, ["m"], overlay_count=2)
    full.update({"m": dense}, labels, indices)
    needed = sparse.needed_classes(labels)
    row_of = rows_of_classes(needed)
    sparse.update({"m": ClassMapRows(dense[torch.from_numpy(needed)], row_of)}, labels, indices)
    for key, value in full.state().items():
        np.testing.assert_array_equal(sparse.state()[key], value, err_msg=key)
    assert full.overlays.keys() == sparse.overlays.keys()
    with pytest.raises(ValueError, match="lacks the map of class"):
        missing = row_of.copy()
        missing[0, 2] = -1
        sparse.update({"m": ClassMapRows(dense.flatten(0, 1), missing)}, labels, indices)


def test_joined_cue_reports_keep_each_maps_images_and_refuse_a_map_twice(layout):
    split, _ = layout
    truth = SyntheticCueTruth(split)
    model_maps = CueLocalization(truth, ["class"], overlay_count=2)
    gradient = CueLocalization(truth, ["grad-vanilla"], overlay_count=2)
    model_maps.update({"class": torch.rand(2, 3, 7, 7)}, torch.tensor([0, 1]), torch.tensor([0, 1]))
    gradient.update({"grad-vanilla": torch.rand(1, 3, 7, 7)}, torch.tensor([0]), torch.tensor([0]))
    joined = model_maps.include(gradient)
    results = joined.results()
    assert list(results["maps"]) == ["class", "grad-vanilla"]
    assert [results["maps"][name]["num_images"] for name in results["maps"]] == [2, 1]
    # the grid of cue maps draws each map's rows only: the gradient's subset stops at image 0
    images = {i: np.zeros((R, R, 3), np.uint8) for i in range(2)}
    assert {item.title.split()[0] for item in cue_overlay_items(joined, split, "grad-vanilla", images)} == {"#0"}
    assert {item.title.split()[0] for item in cue_overlay_items(joined, split, "class", images)} == {"#0", "#1"}
    restored = CueLocalization(truth, ["class"]).include(CueLocalization(truth, ["grad-vanilla"]))
    restored.load_state(joined.state())
    assert restored.results() == results
    with pytest.raises(ValueError, match="both cue benchmarks"):
        joined.include(CueLocalization(truth, ["class"]))
