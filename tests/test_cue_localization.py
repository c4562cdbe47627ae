"""Cue localization (CALM.md §4): the CUB pair grouping and pseudo masks on a tiny CUB-layout fixture, the
synthetic ground truth, PxAP against hand-computed values (fresh and cumulative accumulators), the log grid's
dropped scores, the resize, the two binning paths, and exact merging of shards."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calm_fast.evaluate.attribution.cue import CueLocalization
from calm_fast.data import cub_parts
from calm_fast.data.cue_truth import NO_PART, SyntheticCueTruth, build_pairs
from calm_fast.data.metadata import read_split
from calm_fast.data.metadata_files import MetadataError
from calm_fast.head import all_class_maps, attribution_map
from calm_fast.metrics.cue import CuePixelAP
from calm_fast.metrics.cue_bins import (
    ThresholdGrid,
    bin_rows,
    bin_rows_torch,
    linear_resize_coefficients,
    log_thresholds,
    resize_rows_torch,
)

R = 224
HEAD, BACK, BELLY, BREAST, TAIL, LEG, WING = range(7)


def step_pxap(levels) -> float:
    """PxAP by hand: `levels` lists (positives, negatives) per score level from the top; precision at
    each level times the recall it adds (METRICS.md §4)."""
    total = sum(p for p, _ in levels)
    tp = fp = 0
    area = 0.0
    for positives, negatives in levels:
        tp, fp = tp + positives, fp + negatives
        area += tp / (tp + fp) * positives / total
    return 100 * area


# ------------------------------------------------------------------------------- the CUB fixture

ATTRIBUTES = [
    "has_bill_shape::dagger",           # 1 head (bill)
    "has_wing_color::blue",             # 2 wing
    "has_upperparts_color::blue",       # 3 no group
    "has_shape::long-legged-like",      # 4 leg, by substring of the whole name
    "has_size::small_(5_-_9_in)",       # 5 no group
    "has_primary_color::black",         # 6 no group ("black" does not contain "back")
    "has_back_color::brown",            # 7 back
    "has_forehead_color::red",          # 8 head (forehead)
    "has_under_tail_color::white",      # 9 tail
    "has_breast_pattern::solid",        # 10 breast
    "has_belly_color::white",           # 11 belly
    "has_shape::duck-like",             # 12 no group
]
# Percentages per class (>= 50: present). Class 3 has the back attribute at 49.99 (absent) and the wing
# attribute at exactly 50 (present); class 1 differs from class 0 in the ignored attributes too.
CLASS_ATTRIBUTES = {
    0: {},
    1: {1: 90, 3: 80, 5: 70, 6: 60, 12: 100},
    2: {4: 50.0, 9: 75},
    3: {8: 100, 7: 49.99, 2: 50.0},
}
PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
              "nape", "right eye", "right leg", "right wing", "tail", "throat"]
# Image id -> (path, class, width, height, visible keypoints {part name: (x, y)}).
IMAGES = {
    1: ("001.A/a.jpg", 0, 224, 224, {"beak": (40, 100), "crown": (61, 100), "tail": (150, 100)}),
    2: ("002.B/b.jpg", 1, 448, 112, {"back": (224, 56), "left wing": (103, 30), "right wing": (340, 100),
                                    "beak": (20, 10), "throat": (30, 20)}),
    3: ("003.C/c.jpg", 2, 100, 100, {"left wing": (50, 50)}),
    4: ("004.D/d.jpg", 3, 50, 50, {}),  # listed in images.txt, not in the split
}


def write_cub(root: Path) -> tuple[Path, Path]:
    """A CUB_200_2011-layout folder and WSOL metadata for the test split of images 1-3."""
    cub = root / "CUB"
    (cub / "attributes").mkdir(parents=True)
    (cub / "parts").mkdir()
    (cub / "attributes" / "attributes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(ATTRIBUTES, 1)))
    rows = []
    for label in range(4):
        values = [CLASS_ATTRIBUTES[label].get(a, 0.0) for a in range(1, len(ATTRIBUTES) + 1)]
        rows.append(" ".join(f"{v:.2f}" for v in values))
    (cub / "attributes" / "class_attribute_labels_continuous.txt").write_text("\n".join(rows) + "\n")
    (cub / "parts" / "parts.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(PART_NAMES, 1)))
    (cub / "images.txt").write_text("".join(f"{i} {v[0]}\n" for i, v in IMAGES.items()))
    locs = []
    for image_id, (_, _, _, _, points) in IMAGES.items():
        for part_id, name in enumerate(PART_NAMES, 1):
            x, y = points.get(name, (0.0, 0.0))
            locs.append(f"{image_id} {part_id} {float(x)} {float(y)} {int(name in points)}")
    (cub / "parts" / "part_locs.txt").write_text("\n".join(locs) + "\n")
    for image_id, (path, _, width, height, _) in IMAGES.items():
        segmentation = np.full((height, width), 255, np.uint8)
        if image_id == 1:  # a rectangle: rows 80..119, columns 20..199
            segmentation[:] = 0
            segmentation[80:120, 20:200] = 255
        target = cub / "segmentations" / Path(path).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(target), segmentation)
    meta = root / "metadata" / "CUB" / "test"
    meta.mkdir(parents=True)
    split_ids = [1, 2, 3]
    (meta / "image_ids.txt").write_text("".join(f"{IMAGES[i][0]}\n" for i in split_ids))
    (meta / "class_labels.txt").write_text("".join(f"{IMAGES[i][0]},{IMAGES[i][1]}\n" for i in split_ids))
    (meta / "image_sizes.txt").write_text("".join(f"{IMAGES[i][0]},{IMAGES[i][2]},{IMAGES[i][3]}\n" for i in split_ids))
    return cub, root / "metadata"


@pytest.fixture()
def cub(tmp_path):
    cub_root, metadata = write_cub(tmp_path)
    split = read_split(metadata, "CUB", "test", cub_root / "images", num_classes=4)
    return cub_root, split


def test_attribute_groups_follow_the_substring_rule():
    expected = [1 << HEAD, 1 << WING, 0, 1 << LEG, 0, 0, 1 << BACK, 1 << HEAD, 1 << TAIL, 1 << BREAST, 1 << BELLY, 0]
    assert [cub_parts.attribute_groups(name) for name in ATTRIBUTES] == expected
    assert cub_parts.attribute_groups("has_bill_length::about_the_same_as_head") == 1 << HEAD


def test_cub_pairs_are_grouped_by_differing_part_groups(cub):
    cub_root, _ = cub
    pairs = cub_parts.cub_pairs(cub_root)
    # (0,1): head only (the other attributes of class 1 match no group); (0,2): leg + tail; (0,3) and
    # (1,3): head + wing (back at 49.99 is absent); (1,2): head, leg, tail; (2,3): four groups, not evaluated.
    assert pairs.group_counts == {1: 1, 2: 3, 3: 1, 4: 1}
    assert pairs.class_pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 3], [1, 2]]  # group, then y1, y2
    assert pairs.groups.tolist() == [1, 2, 2, 2, 3]
    assert [pairs.differing_names(p) for p in range(len(pairs))] == [
        ["head"], ["tail", "leg"], ["head", "wing"], ["head", "wing"], ["head", "tail", "leg"]]
    ok, line = cub_parts.check_pair_counts(pairs)
    assert not ok and "1 / 3 / 1" in line and "DIFFER" in line


def test_keypoints_are_scaled_truncated_and_the_head_averaged():
    locations = np.zeros((15, 3))
    for name, (x, y) in IMAGES[2][4].items():
        locations[PART_NAMES.index(name)] = (x, y, 1)
    points, labels = cub_parts.keypoints_224(locations, PART_NAMES, 448, 112)
    # head: beak (10, 20) and throat (15, 40) in the 224 frame, mean (12.5, 30) -> (12, 30); back (112, 112);
    # wings (51.5, 60) -> (51, 60) (truncated, not rounded) and (170, 200); order head, back, wings.
    assert points.tolist() == [[12, 30], [112, 112], [51, 60], [170, 200]]
    assert labels.tolist() == [HEAD, BACK, WING, WING]


def test_pseudo_masks_are_nearest_keypoint_cells_and_the_segmentation(cub):
    cub_root, split = cub
    truth = cub_parts.CubCueTruth(cub_root, split)
    labels, visible = truth.label_maps([0, 1, 2])
    # Image A: head point (50, 100) (mean of x 40 and 61, truncated), tail (150, 100): columns <= 100 go to
    # the head (column 100 is a tie, won by the head, the earlier point), the rest to the tail; only inside
    # the segmentation rectangle rows 80..119, columns 20..199.
    expected = np.full((R, R), NO_PART, np.uint8)
    expected[80:120, 20:101] = HEAD
    expected[80:120, 101:200] = TAIL
    np.testing.assert_array_equal(labels[0], expected)
    assert visible.tolist() == [1 << HEAD | 1 << TAIL, 1 << HEAD | 1 << BACK | 1 << WING, 1 << WING]
    # Image B (full segmentation): every pixel takes its nearest point, by a plain loop.
    points = [((12, 30), HEAD), ((112, 112), BACK), ((51, 60), WING), ((170, 200), WING)]
    for y in range(0, R, 7):
        for x in range(0, R, 5):
            distances = [(x - px) ** 2 + (y - py) ** 2 for (px, py), _ in points]
            assert labels[1, y, x] == points[distances.index(min(distances))][1], (x, y)
    assert (labels[2] == WING).all()


def all_maps(split, values):
    """maps [B, K, 224, 224] from {(image, class): map}; zero elsewhere."""
    maps = torch.zeros(len(split), 4, R, R)
    for (image, label), value in values.items():
        maps[image, label] = torch.as_tensor(value)
    return maps


def cub_maps(split):
    in_segmentation = np.full((R, R), 0.2, np.float32)
    in_segmentation[80:120, 20:200] = 0.6
    # Image A: class 0's map is 0.6 on the segmentation, 0.2 elsewhere; the other classes' maps are 0, so
    # each pair's |difference| is that map. Image B: every class map is 0, a constant difference, zeroed
    # and then dropped by the log grid. Image C takes part only in pairs whose parts it does not show.
    return all_maps(split, {(0, 0): in_segmentation})


def test_cub_pxap_fresh_and_cumulative_against_hand_computed_values(cub):
    cub_root, split = cub
    cue = CueLocalization(cub_parts.CubCueTruth(cub_root, split), ["joint"])
    cue.update({"joint": cub_maps(split)}, torch.from_numpy(split.labels), torch.arange(3))
    result = cue.results(cumulative=True)["maps"]["joint"]
    head, tail, rest = 40 * 81, 40 * 99, R * R - 40 * 180  # pixels of image A
    pxap = [pair["pxap"] for pair in result["pairs"]]
    # (0,1) head: positives = the head cell, all at 0.6 with the tail cell: 3240 / 7200.
    assert pxap[0] == pytest.approx(step_pxap([(head, tail), (0, rest)])) == pytest.approx(45.0)
    assert pxap[1] == pytest.approx(55.0)  # (0,2): the tail cell of A; image C skipped (no tail, no leg)
    assert pxap[2] == pytest.approx(45.0)  # (0,3): head + wing, A shows only the head
    assert pxap[3] is None and pxap[4] is None  # only dropped (zero) scores: undefined, the reference raises
    assert [p["num_images"] for p in result["pairs"]] == [2, 1, 1, 1, 1]
    assert [p["num_skipped"] for p in result["pairs"]] == [0, 1, 0, 0, 1]
    assert result["groups"][1]["mean_pxap"] == pytest.approx(45.0)
    assert result["groups"][2] == {"num_pairs": 3, "num_scored": 2, "mean_pxap": pytest.approx(50.0)}
    assert result["groups"][3]["mean_pxap"] is None
    assert result["mean_pxap"] == pytest.approx((45 + 55 + 45) / 3)  # pair-weighted
    # Cumulative (the reference's accumulator): after (0,2) 7200 / 14400 positives; from (0,3) on
    # 10440 / 21600; images B and C add nothing.
    cumulative = result["cumulative"]
    assert "cumulative" in cumulative["accumulator"]
    assert cumulative["groups"][1]["mean_pxap"] == pytest.approx(45.0)
    assert cumulative["groups"][2]["mean_pxap"] == pytest.approx((50.0 + 2 * 100 * 10440 / 21600) / 3)
    assert cumulative["groups"][3]["mean_pxap"] == pytest.approx(100 * 10440 / 21600)


def test_cub_files_errors_name_file_and_line(cub, tmp_path):
    cub_root, split = cub
    names = cub_root / "attributes" / "attributes.txt"
    names.write_text("1 has_bill_shape::dagger\n3 has_wing_color::blue\n")
    with pytest.raises(MetadataError, match=r"attributes.txt:2"):
        cub_parts.cub_pairs(cub_root)
    names.write_text("".join(f"{i} {n}\n" for i, n in enumerate(ATTRIBUTES, 1)))
    values = cub_root / "attributes" / "class_attribute_labels_continuous.txt"
    values.write_text(values.read_text() + "1 2 3\n")
    with pytest.raises(MetadataError, match=r"continuous.txt:5: expected 12 values"):
        cub_parts.cub_pairs(cub_root)
    with pytest.raises(MetadataError, match=r"parts.txt:1: unknown part 'wingtip'"):
        (tmp_path / "parts.txt").write_text("1 wingtip\n")
        cub_parts.read_part_names(tmp_path / "parts.txt")
    with pytest.raises(MetadataError, match=r"part_locs.txt:2: expected"):
        (tmp_path / "part_locs.txt").write_text("1 1 3.0 4.0 1\n1 x 3.0 4.0 1\n")
        cub_parts.read_part_locations(tmp_path / "part_locs.txt", 15)
    with pytest.raises(MetadataError, match=r"part_locs.txt:2: second location"):
        (tmp_path / "part_locs.txt").write_text("1 1 3.0 4.0 1\n1 1 3.0 4.0 0\n")
        cub_parts.read_part_locations(tmp_path / "part_locs.txt", 15)
    with pytest.raises(MetadataError, match=r"parts.txt:2: not UTF-8 text \(byte 0xe9 at column 4"):
        (tmp_path / "parts.txt").write_bytes(b"1 back\n2 b\xe9ak\n")  # Latin-1, not UTF-8
        cub_parts.read_part_names(tmp_path / "parts.txt")


def test_cub_missing_segmentation_or_image_is_named(cub):
    cub_root, split = cub
    truth = cub_parts.CubCueTruth(cub_root, split)
    (cub_root / "segmentations" / "003.C" / "c.png").unlink()
    with pytest.raises(MetadataError, match=r"003.C/c.png: segmentation missing"):
        truth.label_maps([2])
    (cub_root / "images.txt").write_text("1 001.A/a.jpg\n")
    with pytest.raises(MetadataError, match=r"images.txt: 2 image\(s\) .* not listed, e.g. '002.B/b.jpg'"):
        cub_parts.CubCueTruth(cub_root, split)


# --------------------------------------------------------------------- the synthetic ground truth


def write_hand_synthetic(root: Path):
    """Two images (classes 0 and 1) of a 3-class synthetic layout: slots head and tail, parts body, head,
    tail drawn as rectangles in 112 x 112 part PNGs (each pixel becomes 2 x 2 at 224)."""
    meta = root / "metadata" / "HAND" / "test"
    meta.mkdir(parents=True)
    classes = [{"head": {"variant": 0}, "tail": {"variant": 0}}, {"head": {"variant": 1}, "tail": {"variant": 0}},
               {"head": {"variant": 0}, "tail": {"variant": 1}}]
    (root / "metadata" / "HAND" / "synthetic.json").write_text(json.dumps({"parts": ["body", "head", "tail"],
                                                                          "classes": classes}))
    part_map = np.zeros((112, 112), np.uint8)
    part_map[40:70, 30:80] = 1  # body: 1500 pixels -> 6000 at 224
    part_map[20:30, 80:90] = 2  # head: rows 40..59, columns 160..179 at 224
    part_map[45:55, 10:20] = 3  # tail: rows 90..109, columns 20..39 at 224
    (root / "HAND" / "parts" / "test").mkdir(parents=True)
    lines = {"image_ids.txt": [], "class_labels.txt": [], "image_sizes.txt": [], "parts.txt": []}
    for index in range(2):
        image_id, png = f"test/{index}.jpg", f"parts/test/{index}.png"
        assert cv2.imwrite(str(root / "HAND" / png), part_map)
        lines["image_ids.txt"].append(image_id)
        lines["class_labels.txt"].append(f"{image_id},{index}")
        lines["image_sizes.txt"].append(f"{image_id},112,112")
        for j, (name, box) in enumerate((("body", "30,40,79,69"), ("head", "80,20,89,29"), ("tail", "10,45,19,54"))):
            lines["parts.txt"].append(f"{image_id},{j},{name},{box},{int(j > 0)},{png}")
    for name, rows in lines.items():
        (meta / name).write_text("".join(row + "\n" for row in rows))
    return read_split(root / "metadata", "HAND", "test", root / "HAND", num_classes=3)


def hand_maps():
    """Every class's map of the two images, at 224 (no resize), chosen so each pair's |difference| is simple."""
    body, head, tail = (slice(80, 140), slice(60, 160)), (slice(40, 60), slice(160, 180)), (slice(90, 110), slice(20, 40))
    maps = torch.zeros(2, 3, R, R)
    maps[0, 1][40:50, 160:180] = 0.75  # image 0, pair (0,1): head top half 0.75, bottom half 0
    maps[0, 1][body] = 0.25
    maps[0, 2][tail] = 0.25  # pair (0,2): the tail at 0.25, all else 0
    maps[1, 0][head] = 0.25  # image 1, pair (0,1): head at 0.25, a background patch at 0.75
    maps[1, 0][200:210, 200:220] = 0.75
    maps[1, 2][head] = maps[1, 2][tail] = maps[1, 2][body] = 0.75  # pair (1,2): head + tail and body at 0.75
    return maps


def test_synthetic_pxap_by_hand(tmp_path):
    split = write_hand_synthetic(tmp_path)
    truth = SyntheticCueTruth(split)
    assert truth.pairs.class_pairs.tolist() == [[0, 1], [0, 2], [1, 2]]
    assert truth.pairs.groups.tolist() == [1, 1, 2]
    labels, visible = truth.label_maps([0])
    assert (labels[0] == 1).sum() == 400 and (labels[0] == 0).sum() == 6000 and visible[0] == 0b111
    assert (labels[0][40:60, 160:180] == 1).all()
    for grid in (ThresholdGrid("log"), ThresholdGrid("linear", 0.01)):
        cue = CueLocalization(truth, ["joint"], grid=grid)
        cue.update({"joint": hand_maps()}, torch.tensor([0, 1]), torch.tensor([0, 1]))
        result = cue.results(cumulative=True)["maps"]["joint"]
        pxap = [pair["pxap"] for pair in result["pairs"]]
        if grid.kind == "log":
            # (0,1): positives 200 at 0.75 (image 0's head top), 400 at 0.25 (image 1's head); image 0's
            # head bottom (200 at 0) is dropped. Negatives: 200 at 0.75 (patch), 6000 at 0.25 (body).
            # PxAP = 0.5 * 1/3 + 600/6800 * 2/3.
            assert pxap[0] == pytest.approx(100 * (0.5 / 3 + 600 / 6800 * 2 / 3))
        else:  # zeros count: the 200 head pixels at 0 are positives of the last level, with every zero negative
            zeros = 2 * R * R - 800 - 200 - 6000
            assert pxap[0] == pytest.approx(100 * (0.5 * 0.25 + 600 / 6800 * 0.5 + 800 / (800 + 6200 + zeros) * 0.25))
        assert pxap[1] == pytest.approx(100.0)  # only the tail scores above zero
        assert pxap[2] == pytest.approx(100 * 800 / 6800)
        assert result["groups"][1]["mean_pxap"] == pytest.approx((pxap[0] + 100) / 2)
        assert result["mean_pxap"] == pytest.approx(sum(pxap) / 3)
        if grid.kind == "log":  # (0,1) and (0,2) pooled, then (1,2) added
            cumulative_02 = step_pxap([(200, 200), (800, 6000)])
            cumulative_12 = step_pxap([(1000, 6200), (800, 6000)])
            assert result["cumulative"]["groups"][1]["mean_pxap"] == pytest.approx((pxap[0] + cumulative_02) / 2)
            assert result["cumulative"]["groups"][2]["mean_pxap"] == pytest.approx(cumulative_12)


def test_synthetic_truth_of_generated_data_matches_the_class_table(tmp_path):
    from calm_fast.data.synthetic import CLASS_SLOTS, PART_NAMES, class_table, generate

    generate(tmp_path, name="SYNTH", seed=1, num_classes=8, sizes={"test": 8}, image_size=48, workers=1)
    split = read_split(tmp_path / "metadata", "SYNTH", "test", tmp_path / "SYNTH", num_classes=8)
    truth = SyntheticCueTruth(split)
    table = class_table(8)
    assert truth.pairs.group_counts == {1: 12, 2: 12, 3: 4}
    for p, (a, b) in enumerate(truth.pairs.class_pairs.tolist()):
        slots = [slot for s, slot in enumerate(CLASS_SLOTS) if table[a][s] != table[b][s]]
        assert truth.pairs.differing_names(p) == [name for name in PART_NAMES if name in slots]
        assert truth.pairs.groups[p] == len(slots)
    labels, visible = truth.label_maps(np.arange(8))
    every_part = (1 << len(PART_NAMES)) - 1
    assert (visible == every_part).all()
    for i in range(8):  # the label map is the part PNG, nearest-resized, part j -> label j
        part_png = cv2.imread(str(split.parts[i].mask_path), cv2.IMREAD_GRAYSCALE)
        resized = cv2.resize(part_png, (R, R), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(labels[i], np.where(resized == 0, NO_PART, resized - 1))


def test_synthetic_manifest_problems_are_named(tmp_path):
    split = write_hand_synthetic(tmp_path)
    manifest = tmp_path / "metadata" / "HAND" / "synthetic.json"
    manifest.write_text(json.dumps({"parts": ["body", "head"], "classes": [{"tail": {"variant": 0}}] * 3}))
    with pytest.raises(MetadataError, match=r"synthetic.json: class slot\(s\) \['tail'\] are not among the parts"):
        SyntheticCueTruth(split)
    manifest.unlink()
    with pytest.raises(MetadataError, match="synthetic.json: missing"):
        SyntheticCueTruth(split)


# ------------------------------------------------------------------------- grid, bins and the resize


def test_log_grid_is_the_references_and_drops_scores_below_its_first_edge():
    thresholds = log_thresholds(0.001)
    assert len(thresholds) == 1000 and thresholds[-1] == 1.0
    assert thresholds[0] == pytest.approx(10 ** -6.993, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.log10(thresholds)), 0.007, rtol=1e-9)
    # Positives: 3 at 0.8, 2 at 0.4, 4 at exactly 0 and 1 at 5e-8 (both below 1.016e-7: dropped);
    # negatives: 1 at 0.8, 6 at 0.4, 5 at 0 and 2 at 1.02e-7 (kept: the lowest bin).
    scores = np.array([0.8] * 3 + [0.4] * 2 + [0.0] * 4 + [5e-8] + [0.8] + [0.4] * 6 + [0.0] * 5 + [1.02e-7] * 2)
    masks = np.array([1] * 10 + [0] * 14)
    results = {}
    for grid in (ThresholdGrid("log"), ThresholdGrid("linear", 0.01)):
        metric = CuePixelAP([1], grid)
        metric.update(scores[None, None].astype(np.float32), masks[None, None], [0])
        results[grid.kind] = metric.compute()["pairs"][0]["pxap"]
    assert results["log"] == pytest.approx(100 * (3 / 4 * 3 / 5 + 5 / 12 * 2 / 5))
    assert results["linear"] == pytest.approx(100 * (3 / 4 * 3 / 10 + 5 / 12 * 2 / 10 + 10 / 24 * 5 / 10))


def test_both_binning_paths_equal_np_histogram_on_edges_and_specials():
    rng = np.random.default_rng(0)
    for grid in (ThresholdGrid("log"), ThresholdGrid("linear", 0.01), ThresholdGrid("linear", 0.001)):
        scores = (rng.random((4, 40, 40)) ** 8).astype(np.float32)
        scores[0, :3] = np.resize(grid.edges.astype(np.float32), (3, 40))  # on the edges, rounded to float32
        scores[1, 0] = np.resize(np.nextafter(grid.edges32, np.float32(0)), 40)  # just below them
        scores[2, 0, :6] = [0.0, -0.0, np.nan, 1.0, 3.0, 3.5]
        labels = rng.integers(0, 3, (2, 40, 40)).astype(np.uint8)
        labels[0, :2] = NO_PART
        row_image, row_bits = np.array([0, 1, 0, 1]), np.array([0b10, 0b110, 0b1, 0])
        expected = np.zeros((4, 2, grid.num_bins), np.int64)
        for r in range(4):
            positive = (row_bits[r] >> np.minimum(labels[row_image[r]], 62).astype(np.int64)) & 1
            positive = positive.astype(bool) & (labels[row_image[r]] != NO_PART)
            for flag in (0, 1):
                chosen = scores[r][positive == flag].astype(np.float64)
                expected[r, flag] = np.histogram(chosen[~np.isnan(chosen)], grid.edges)[0]
        np.testing.assert_array_equal(bin_rows(scores, labels, row_image, row_bits, grid), expected)
        got = bin_rows_torch(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(row_image),
                             torch.from_numpy(row_bits), grid)
        np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("shape", [(16, 16), (7, 9), (28, 28), (300, 250)])
def test_resize_is_opencv_inter_linear_up_to_rounding_and_both_paths_agree_bitwise(shape):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal((5, *shape)) * 1e-3).astype(np.float32)
    values[4] = 0.25  # constant: zeroed by every normalisation
    resized = resize_rows_torch(torch.from_numpy(values), R, R).numpy()
    opencv = np.stack([cv2.resize(v, (R, R), interpolation=cv2.INTER_LINEAR) for v in values])
    np.testing.assert_allclose(resized, opencv, rtol=0, atol=3e-5 * np.abs(opencv).max())
    labels = rng.integers(0, 4, (3, R, R)).astype(np.uint8)
    rows, bits = np.array([0, 1, 2, 0, 1]), np.array([0b1, 0b10, 0b100, 0b1000, 0b11])
    for normalization in ("clip", "minmax", "max"):
        for grid in (ThresholdGrid("log"), ThresholdGrid("linear", 0.01)):
            host = bin_rows(values, labels, rows, bits, grid, normalization)
            device = bin_rows_torch(torch.from_numpy(values), torch.from_numpy(labels), torch.from_numpy(rows),
                                    torch.from_numpy(bits), grid, normalization).numpy()
            np.testing.assert_array_equal(host, device)
            assert host[4].sum() == (0 if grid.kind == "log" else R * R)  # zeroed: dropped, or all in bin 0


def test_difference_before_resize_against_an_opencv_pipeline():
    """The reference: cv2 INTER_LINEAR of the low-resolution difference, |.|, clip, np.histogram. Ours
    differs only by the resize's last bits, so at most a few pixels may change bins."""
    rng = np.random.default_rng(2)
    low = rng.random((6, 14, 14)).astype(np.float32) * 0.3
    high = rng.random((6, 14, 14)).astype(np.float32) * 0.3
    labels = rng.integers(0, 2, (6, R, R)).astype(np.uint8)
    grid = ThresholdGrid("log")
    ours = bin_rows(low - high, labels, np.arange(6), np.full(6, 0b10), grid, "clip")
    for r in range(6):
        scores = np.abs(cv2.resize(low[r] - high[r], (R, R), interpolation=cv2.INTER_LINEAR))
        scores = np.minimum(scores, 1).astype(np.float64)
        for flag in (0, 1):
            reference = np.histogram(scores[labels[r] == flag], grid.edges)[0]
            assert np.abs(ours[r, flag] - reference).sum() <= 10
    first, second, w_first, w_second = linear_resize_coefficients(14, R)
    assert first[0] == 0 and w_second[0] == 0 and second[-1] == 13 and w_second[-1] == 0


# --------------------------------------------------------------------------- maps, state and merging


def test_all_class_maps_are_every_class_attribution_map():
    torch.manual_seed(0)
    class_logits, location = torch.randn(3, 5, 4, 4), torch.randn(3, 1, 4, 4)
    for kind in ("joint", "posterior", "class"):
        every = all_class_maps(class_logits, location, kind)
        for label in range(5):
            expected = attribution_map(class_logits, location, torch.full((3,), label), kind)
            torch.testing.assert_close(every[:, label], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same for every class"):
        all_class_maps(class_logits, location, "prior")


def test_two_shards_merged_equal_one_pass_and_both_backends_agree(cub):
    cub_root, split = cub
    truth = cub_parts.CubCueTruth(cub_root, split)
    rng = np.random.default_rng(3)
    maps = {"joint": torch.from_numpy(rng.random((3, 4, 7, 7)).astype(np.float32) * 0.05),
            "class": torch.from_numpy(rng.standard_normal((3, 4, 7, 7)).astype(np.float32))}
    labels = torch.from_numpy(split.labels)

    def run(indices, histogram="numba"):
        cue = CueLocalization(truth, ["joint", "class"], histogram=histogram, chunk_rows=1)
        index = torch.tensor(indices)
        cue.update({name: value[index] for name, value in maps.items()}, labels[index], index)
        return cue

    whole = run([0, 1, 2])
    assert whole.normalization == {"joint": "clip", "class": "minmax"}
    merged = run([0, 2]).merge(run([1]))
    summed = CueLocalization(truth, ["joint", "class"])
    shards = [run([1, 0]).state(), run([2]).state()]
    summed.load_state({key: shards[0][key] + shards[1][key] for key in shards[0]})
    on_torch = run([0, 1, 2], histogram="torch")
    for other in (merged, summed, on_torch):
        assert other.state().keys() == whole.state().keys()
        for key, value in whole.state().items():
            np.testing.assert_array_equal(other.state()[key], value, err_msg=key)
    assert whole.state()["joint/positive_hist"].sum() > 0


def test_bad_inputs_are_named(cub):
    cub_root, split = cub
    truth = cub_parts.CubCueTruth(cub_root, split)
    with pytest.raises(ValueError, match="normalization of map 'joint'"):
        CueLocalization(truth, ["joint"], normalization="none")
    cue = CueLocalization(truth, ["joint"])
    with pytest.raises(KeyError, match="needs the maps"):
        cue.update({"class": torch.zeros(1, 4, 7, 7)}, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, K=4, h, w\]"):
        cue.update({"joint": torch.zeros(1, 3, 7, 7)}, torch.tensor([0]), torch.tensor([0]))
    metric = CuePixelAP([1, 2])
    with pytest.raises(ValueError, match="cannot merge"):
        metric.merge(CuePixelAP([1, 2], ThresholdGrid("linear", 0.01)))
    with pytest.raises(ValueError, match="0 and 1"):
        metric.update(np.zeros((1, 2, 2), np.float32), np.full((1, 2, 2), 2), [0])
    with pytest.raises(ValueError, match="at most 63"):
        build_pairs(np.zeros((2, 2), np.int64), [str(i) for i in range(64)])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_map_is_refused_naming_the_sample(cub, value):
    from calm_fast.errors import NonFiniteMapError

    cub_root, split = cub
    maps = cub_maps(split)
    maps[0, 1, 3, 3] = value  # image 0's map of class 1: in the differences of image 0's pairs with class 1
    cue = CueLocalization(cub_parts.CubCueTruth(cub_root, split), ["class"])
    with pytest.raises(NonFiniteMapError, match=r"the 'class' map of sample 0 is not finite .* class pair \(0, 1\)"):
        cue.update({"class": maps}, torch.from_numpy(split.labels), torch.arange(3))


def test_needed_classes_and_kept_overlays(cub):
    cub_root, split = cub
    truth = cub_parts.CubCueTruth(cub_root, split)
    cue = CueLocalization(truth, ["joint"], overlay_count=1)
    # class 0 pairs with 1, 2, 3; class 1 with 0, 3, 2; class 2 with 0, 1 (its pair with 3 is not evaluated)
    assert cue.needed_classes([0, 1, 2]).tolist() == [[True] * 4, [True] * 4, [True, True, True, False]]
    maps = cub_maps(split)
    cue.update({"joint": maps}, torch.from_numpy(split.labels), torch.arange(3))
    assert sorted(cue.overlays) == [(0, 0), (0, 1), (0, 2)]  # image 0's rows: pairs (0,1), (0,2), (0,3)
    np.testing.assert_array_equal(cue.overlays[(0, 1)]["joint"], (maps[0, 0] - maps[0, 2]).numpy())


def test_cue_table_shows_groups_fresh_and_cumulative(cub):
    from rich.console import Console

    from calm_fast import report

    cub_root, split = cub
    cue = CueLocalization(cub_parts.CubCueTruth(cub_root, split), ["joint"])
    cue.update({"joint": cub_maps(split)}, torch.from_numpy(split.labels), torch.arange(3))
    console = Console(width=160, record=True)
    console.print(report.cue_table(cue.results(cumulative=True)))
    text = console.export_text()
    assert "45.00 (1/1)" in text and "50.00 (2/3)" in text and "– (0/1)" in text and "48.33" in text
    assert "cumulative (reference)" in text and "zeros included, dropped" in text


def test_the_cub_pair_count_check_is_reported(cub):
    cub_root, split = cub
    cue = CueLocalization(cub_parts.CubCueTruth(cub_root, split), ["joint"])
    (line,) = cue.results()["checks"]
    assert line == "CUB cue pairs with 1 / 2 / 3 differing part groups: 1 / 3 / 1: DIFFER from the published 31 / 64 / 96"
    published = dataclasses.replace(cue.truth.pairs, group_counts={0: 5, 1: 31, 2: 64, 3: 96, 4: 19704})
    ok, line = cub_parts.check_pair_counts(published)
    assert ok and line.endswith("31 / 64 / 96: match the published 31 / 64 / 96")
