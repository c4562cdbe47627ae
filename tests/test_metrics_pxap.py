"""PxAP and GT masks: hand-computed cases of METRICS.md §4-§5, merging, and the np.histogram oracle."""

import cv2
import numpy as np
import pytest

from calm_fast.metrics import PixelAP, load_gt_mask
from calm_fast.metrics.opencv_reference import reference_pxap


def pxap_of(scores, labels, interval=0.01):
    metric = PixelAP(interval)
    metric.update(np.asarray(scores, np.float64)[None, None, :], np.asarray(labels, np.uint8)[None, None, :])
    return metric.compute()["pxap"]


def test_score_of_exactly_one_is_the_extra_curve_point():
    # Positives 1.0 and 0.5, negatives 0.995 and 0.2. Curve (precision, recall) from the top:
    # ">= 1.0": (1, 1/2); ">= 0.99": (1/2, 1/2); ... ">= 0.5": (2/3, 1); lower: recall stays 1.
    expected = 100 * (1 * 0.5 + (2 / 3) * 0.5)
    assert pxap_of([1.0, 0.5, 0.995, 0.2], [1, 1, 0, 0]) == pytest.approx(expected, rel=1e-12)
    # Without the ">= 1.0" point the first step would be (1/2, 1/2): 100 * (0.25 + 1/3).
    assert pxap_of([1.0, 0.5, 0.995, 0.2], [1, 1, 0, 0]) != pytest.approx(100 * (0.25 + 1 / 3))


def test_bins_are_left_closed_on_numpy_arange_edges():
    # A positive at exactly t_50 = 0.5 is counted at ">= 0.5"; a negative just below it is not.
    below = np.nextafter(0.5, 0.0)
    assert pxap_of([0.5, below], [1, 0]) == pytest.approx(100.0)
    assert pxap_of([below, 0.5], [1, 0]) == pytest.approx(50.0)


def test_pooled_over_the_set_not_averaged_per_image():
    metric = PixelAP()
    metric.update(np.array([[[0.9, 0.1]], [[0.2, 0.8]]]), np.array([[[1, 0]], [[1, 0]]], np.uint8))
    # Per-image APs are 100 and 50 (mean 75); pooled: (1, 1/2) at 0.9, then (2/3, 1) at 0.2.
    assert metric.compute()["pxap"] == pytest.approx(100 * (0.5 + (2 / 3) * 0.5), rel=1e-12)


def test_constant_map_gives_the_positive_fraction_and_ignores_255():
    labels = np.zeros((1, 10, 10), np.uint8)
    labels[0, :3] = 1  # 30 positives
    labels[0, 3:5] = 255  # 20 ignored
    metric = PixelAP()
    metric.update(np.full((1, 10, 10), 0.37), labels)
    assert metric.compute()["pxap"] == pytest.approx(100 * 30 / 80, rel=1e-12)


def test_no_positive_pixel_is_an_error():
    metric = PixelAP()
    metric.update(np.full((1, 4, 4), 0.5), np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(RuntimeError, match="No positive ground truth"):
        metric.compute()


def test_invalid_inputs_are_named():
    metric = PixelAP()
    with pytest.raises(ValueError, match="does not match"):
        metric.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        metric.update(np.full((1, 4, 4), 1.5), np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        metric.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    for value in (2, 7, 254):
        masks = np.zeros((2, 4, 4), np.uint8)
        masks[1, 2, 2] = value
        with pytest.raises(ValueError, match=rf"gt_masks\[1\] holds the value {value}"):
            metric.update(np.zeros((2, 4, 4)), masks)
    assert metric.state_dict()["num_images"] == 0  # nothing was counted from the refused batches
    with pytest.raises(ValueError, match="not finite|NaN"):
        metric.update(np.full((1, 4, 4), np.inf), np.zeros((1, 4, 4), np.uint8))


def random_set(seed, count=6, size=224):
    rng = np.random.default_rng(seed)
    maps = rng.random((count, size, size)) ** 3
    maps[:, :8, :8] = 1.0  # exact 1.0 scores: the "[1, 2)" bin
    maps[:, 8:16, :8] = np.round(maps[:, 8:16, :8], 2)  # scores sitting on bin edges (up to arange bits)
    masks = (rng.random((count, size, size)) < maps * 0.8).astype(np.uint8)
    masks[:, -20:, -20:] = 255
    return maps, masks


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_matches_the_np_histogram_reference_bit_for_bit(interval):
    maps, masks = random_set(0)
    metric = PixelAP(interval)
    metric.update(maps, masks)
    result, expected = metric.compute(), reference_pxap(maps, masks, interval)
    assert result["pxap"] == expected["pxap"]
    np.testing.assert_array_equal(result["precision"], expected["precision"])
    np.testing.assert_array_equal(result["recall"], expected["recall"])


def test_shards_merged_equal_one_pass():
    maps, masks = random_set(1, count=7, size=64)
    whole = PixelAP()
    whole.update(maps, masks)
    shards = [PixelAP() for _ in range(3)]
    for shard, part in zip(shards, np.array_split(np.arange(7), 3)):
        shard.update(maps[part], masks[part])
    merged = PixelAP().merge(shards[0]).merge(shards[1]).merge(shards[2])
    via_state = PixelAP()
    via_state.load_state_dict({name: sum(s.state_dict()[name] for s in shards) for name in whole.state_dict()})
    for combined in (merged, via_state):
        for name, value in whole.state_dict().items():
            np.testing.assert_array_equal(combined.state_dict()[name], value)
        assert combined.compute()["pxap"] == whole.compute()["pxap"]
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(PixelAP(0.01))


def test_load_gt_mask_resizes_nearest_unites_instances_and_ignores(tmp_path):
    height, width = 30, 17
    rng = np.random.default_rng(2)
    first, second = (rng.random((height, width)) < 0.3), (rng.random((height, width)) < 0.3)
    ignore = np.zeros((height, width), bool)
    ignore[:10] = True
    for name, mask, value in (("a.png", first, 255), ("b.png", second, 1), ("ignore.png", ignore, 200)):
        assert cv2.imwrite(str(tmp_path / name), mask.astype(np.uint8) * value)
    gt = load_gt_mask([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "ignore.png")
    # Nearest neighbour: destination pixel d reads source floor(d * src_len / 224).
    rows = (np.arange(224) * height) // 224
    cols = (np.arange(224) * width) // 224
    foreground = (first | second)[np.ix_(rows, cols)]
    expected = np.where(foreground, 1, np.where(ignore[np.ix_(rows, cols)], 255, 0)).astype(np.uint8)
    assert gt.dtype == np.uint8 and gt.shape == (224, 224)
    np.testing.assert_array_equal(gt, expected)
    np.testing.assert_array_equal(load_gt_mask([tmp_path / "b.png"]), second[np.ix_(rows, cols)].astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_gt_mask([tmp_path / "missing.png"])


def test_mask_files_that_a_grayscale_read_would_misread_are_refused_or_converted(tmp_path):
    from calm_fast.errors import InputFileError, UserError

    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    # 16 bits: a grayscale read scales values down by 256, so this 0/1 mask would be all background.
    assert cv2.imwrite(str(tmp_path / "deep.png"), mask.astype(np.uint16))
    with pytest.raises(InputFileError, match=r"deep\.png: a uint16 mask image; masks are 8-bit grayscale"):
        load_gt_mask([tmp_path / "deep.png"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    with pytest.raises(UserError, match=r"broken\.png: cannot decode"):
        load_gt_mask([tmp_path / "broken.png"])
    # Colour masks are read through the grayscale conversion, as the reference reads every mask: a pure blue
    # foreground of 255 becomes 29 (> 0.5), so it is the same mask as its grayscale copy.
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[5:15, 5:15, 0] = 255
    assert cv2.imwrite(str(tmp_path / "colour.png"), colour)
    assert cv2.imwrite(str(tmp_path / "gray.png"), mask * 255)
    np.testing.assert_array_equal(load_gt_mask([tmp_path / "colour.png"]), load_gt_mask([tmp_path / "gray.png"]))
    assert load_gt_mask([tmp_path / "gray.png"]).sum() > 0
