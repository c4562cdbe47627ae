"""Box metrics: hand-computed cases of METRICS.md §3 and §5, run on the fast path and on the OpenCV oracle."""

import numpy as np
import pytest

from calm_fast.metrics import (
    BoxAccuracy,
    best_box_iou,
    box_correctness,
    cam_thresholds,
    normalize_scoremaps,
    rescale_boxes,
)
from calm_fast.metrics.opencv_reference import reference_best_box_iou


def fast_best_iou(maps, gt_boxes, interval=0.01, multi_contour=True):
    return best_box_iou(maps, gt_boxes, interval, multi_contour, num_threads=1)


def reference_best_iou(maps, gt_boxes, interval=0.01, multi_contour=True):
    return reference_best_box_iou(maps, gt_boxes, interval, multi_contour)


both_paths = pytest.mark.parametrize("best_iou", [fast_best_iou, reference_best_iou], ids=["fast", "opencv"])


def blank(size=224):
    return np.zeros((size, size))


def u8(level):
    """A score whose uint8 quantisation (s * 255, truncated) is exactly `level`."""
    return (level + 0.5) / 255


def iou(a, b):
    """Inclusive-end IoU, written out independently of the package."""
    inter_w = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    inter_h = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = inter_w * inter_h
    area = lambda box: (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@both_paths
def test_19x19_blob_box_is_one_pixel_larger(best_iou):
    scoremap = blank()
    scoremap[50:69, 60:79] = 1.0  # pixels x 60..78, y 50..68
    best = best_iou(scoremap[None], [np.array([[60, 50, 78, 68]])])
    assert np.all(best == 361 / 400)


@both_paths
def test_box_is_clipped_at_the_last_pixel(best_iou):
    scoremap = blank()
    scoremap[200:224, 210:224] = 1.0  # touches the right and bottom border: box (210, 200, 223, 223)
    best = best_iou(scoremap[None], [np.array([[210, 200, 223, 223]])])
    assert np.all(best == 1.0)


@pytest.mark.parametrize("delta, exact, smaller", [
    (30, (10, 10, 21, 19), (10, 10, 21, 18)),  # 120 and 108 of the 400 predicted pixels
    (50, (10, 10, 29, 19), (10, 10, 29, 18)),  # 200 and 180
    (70, (10, 10, 29, 23), (10, 10, 29, 22)),  # 280 and 260
])
def test_iou_exactly_at_the_threshold_counts(delta, exact, smaller):
    scoremap = blank()
    scoremap[10:29, 10:29] = 1.0  # predicted box (10, 10, 29, 29): 400 pixels, GT boxes inside it
    assert iou((10, 10, 29, 29), exact) == delta / 100
    for num_threads in (1, None):
        correct = box_correctness(np.stack([scoremap, scoremap]), [np.array([exact]), np.array([smaller])],
                                  iou_thresholds=(delta,), num_threads=num_threads)
        assert correct[0, 0].all() and not correct[1, 0].any()


@both_paths
def test_empty_foreground_scores_the_box_0000(best_iou):
    maps = np.stack([blank(), np.full((224, 224), 0.003)])  # the second quantises to all zeros
    best = best_iou(maps, [np.array([[0, 0, 0, 0]]), np.array([[0, 0, 1, 1]])])
    assert np.all(best[0] == 1.0)
    assert np.all(best[1] == 1 / 4)


@both_paths
def test_scores_below_one_255th_are_background_even_at_tau_0(best_iou):
    scoremap = blank()
    scoremap[100:110, 100:110] = 1.0
    scoremap[0:100, 0:100] = 0.9 / 255  # u = 0: never foreground since foreground is u > θ >= 0
    best = best_iou(scoremap[None], [np.array([[100, 100, 110, 110]])])
    assert best[0, 0] == 1.0


def test_constant_cams_through_normalize_scoremaps():
    rippled = normalize_scoremaps([np.full((7, 7), value) for value in (3.7, 0.1, 0.3)])
    exact = normalize_scoremaps([np.full((7, 7), value) for value in (0.25, -2.0, 1.0, 5.0)])
    # Bicubic ripples of ~1e-15 are stretched to [0, 1] by min-max, as in the reference pipeline.
    assert all(m.min() == 0.0 and m.max() == 1.0 for m in rippled)
    assert not exact.any()


def test_normalize_scoremaps_is_min_max_of_the_bicubic_resize():
    cam = np.array([[0.0, 2.0], [4.0, 8.0]])
    out = normalize_scoremaps([cam, np.ones((5, 9))])
    assert out.shape == (2, 224, 224) and out.dtype == np.float64
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert out[0][0, 0] < out[0][0, 223] < out[0][223, 223]  # orientation kept: x to the right, y down
    assert not out[1].any()
    # A 224 x 224 map is not resized: min-max is all that happens.
    big = np.random.default_rng(0).random((224, 224)) * 3 + 1
    np.testing.assert_array_equal(normalize_scoremaps([big])[0], (big - big.min()) / (big - big.min()).max())


@both_paths
def test_integer_threshold_is_truncated_relative_to_the_map_maximum(best_iou):
    scoremap = blank()
    scoremap[100:110, 100:110] = u8(200)  # the peak: u = 200, so τ = 0.29 gives θ = int(57.99...) = 57
    scoremap[100:110, 110:140] = u8(58)  # foreground iff θ < 58
    best = best_iou(scoremap[None], [np.array([[100, 100, 140, 110]])])
    k = 29
    assert cam_thresholds(0.01)[k] * 200 < 58
    assert best[0, k] == 1.0  # the u = 58 strip is in (it would not be with θ = 58)
    assert best[0, k + 1] == iou((100, 100, 110, 110), (100, 100, 140, 110))


def test_threshold_grid_uses_numpy_arange_values():
    grid = cam_thresholds(0.01)
    assert len(grid) == 100 and len(cam_thresholds(0.001)) == 1000 and len(cam_thresholds(0.05)) == 20
    assert grid[35] == 0.35000000000000003
    off_by_one_bit = [k for k in range(100) if grid[k] != k / 100]
    assert off_by_one_bit == [35, 41, 47, 57, 69, 70, 82, 83, 94, 95]


@both_paths
def test_arange_bits_change_the_integer_threshold(best_iou):
    # max u = 100: arange[57] * 100 = 57.000...01 gives θ = 57, whereas 0.57 * 100 = 56.99... would give 56.
    scoremap = blank()
    scoremap[100:110, 100:110] = u8(100)
    scoremap[100:110, 110:140] = u8(57)  # foreground iff θ < 57
    best = best_iou(scoremap[None], [np.array([[100, 100, 110, 110]])])
    assert best[0, 56] == iou((100, 100, 140, 110), (100, 100, 110, 110))
    assert best[0, 57] == 1.0


@both_paths
def test_single_contour_picks_the_largest_polygon_area_not_pixel_count(best_iou):
    scoremap = blank()
    scoremap[20, 5:215] = 1.0  # a 210-pixel line: contour area 0
    scoremap[100:104, 100:104] = 1.0  # a 4x4 blob: contour area 9
    line_box, blob_box = np.array([[5, 20, 215, 21]]), np.array([[100, 100, 104, 104]])
    single = best_iou(np.stack([scoremap, scoremap]), [line_box, blob_box], multi_contour=False)
    multi = best_iou(np.stack([scoremap, scoremap]), [line_box, blob_box], multi_contour=True)
    assert np.all(single[0] == 0.0) and np.all(single[1] == 1.0)
    assert np.all(multi == 1.0)


@both_paths
def test_single_contour_ties_keep_opencv_first_contour(best_iou):
    # Two equal 3x3 blobs (area 4 each): OpenCV lists the one found last in raster order first.
    scoremap = blank()
    scoremap[10:13, 150:153] = 1.0  # first in raster order (top row)
    scoremap[50:53, 20:23] = 1.0  # found later: it is listed first and kept
    best = best_iou(scoremap[None], [np.array([[20, 50, 23, 53]])], multi_contour=False)
    assert np.all(best == 1.0)


@both_paths
def test_blobs_are_8_connected(best_iou):
    scoremap = blank()
    scoremap[10:15, 10:15] = 1.0
    scoremap[15:20, 15:20] = 1.0  # touches the first square at one corner only
    best = best_iou(scoremap[None], [np.array([[10, 10, 20, 20]])])
    assert np.all(best == 1.0)  # one box around both; 4-connectivity would give 36/121 at best


@both_paths
def test_hole_contours_give_grown_boxes_in_multi_contour_mode(best_iou):
    scoremap = blank()
    scoremap[20:40, 20:40] = 1.0
    scoremap[25:35, 25:35] = 0.0  # hole pixels 25..34: its contour box is (24, 24, 36, 36)
    hole_box = np.array([[24, 24, 36, 36]])
    assert np.all(best_iou(scoremap[None], [hole_box], multi_contour=True) == 1.0)
    # Single-contour mode keeps the outer contour (20, 20, 40, 40) only.
    assert np.all(best_iou(scoremap[None], [hole_box], multi_contour=False) == iou((20, 20, 40, 40), hole_box[0]))


@both_paths
def test_holes_are_4_connected_and_clipped(best_iou):
    scoremap = blank()
    scoremap[200:224, 190:224] = 1.0
    scoremap[205:210, 200:223] = 0.0  # hole reaching x = 222: box (199, 204, min(224, 223), 211)
    scoremap[212, 200] = scoremap[213, 201] = 0.0  # two diagonal background pixels: two separate holes
    boxes = [np.array([[199, 204, 223, 211]]), np.array([[199, 211, 202, 214]]), np.array([[200, 212, 203, 215]])]
    best = best_iou(np.stack([scoremap] * 3), boxes, multi_contour=True)
    assert np.all(best == 1.0)


@both_paths
def test_hole_appears_only_at_thresholds_where_it_is_enclosed(best_iou):
    scoremap = blank()
    scoremap[20:40, 20:40] = u8(200)
    scoremap[20:40, 30] = u8(100)  # a gap in the wall at the top and bottom rows joins hole and outside
    scoremap[25:35, 25:35] = 0.0
    scoremap[0, 0] = 1.0  # peak 255
    best = best_iou(scoremap[None], [np.array([[24, 24, 36, 36]])], interval=0.001)
    grid = cam_thresholds(0.001)
    levels = (grid * 255).astype(int)
    enclosed = levels < 100  # the wall is closed while u = 100 is foreground
    assert np.all(best[0, enclosed] == 1.0) and np.all(best[0, ~enclosed] < 1.0)


def test_rescale_boxes_truncates_float_scaling():
    boxes = rescale_boxes(np.array([[10, 20, 99, 150], [0, 0, 299, 399]]), (300, 400))
    # 10*224/300 = 7.47, 20*224/400 = 11.2, 99*224/300 = 73.92, 150*224/400 = 84.0, 299*224/300 = 223.25
    np.testing.assert_array_equal(boxes, [[7, 11, 73, 84], [0, 0, 223, 223]])
    assert boxes.dtype == np.int64
    with pytest.raises(ValueError, match="x1 < x0"):
        rescale_boxes([[50, 0, 10, 10]], (100, 100))
    with pytest.raises(ValueError, match="image_size"):
        rescale_boxes([[0, 0, 10, 10]], (0, 100))


def test_invalid_inputs_are_named():
    good = blank()[None]
    with pytest.raises(ValueError, match=r"scoremaps\[0\].*outside \[0, 1\]"):
        best_box_iou(good + 2.0, [np.array([[0, 0, 1, 1]])])
    with pytest.raises(ValueError, match="NaN"):
        best_box_iou(good * np.nan, [np.array([[0, 0, 1, 1]])])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]"):
        best_box_iou(good, [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="rescale_boxes"):
        best_box_iou(good, [np.array([[0.5, 0, 1, 1]])])
    with pytest.raises(ValueError, match="2 GT box lists"):
        best_box_iou(good, [np.array([[0, 0, 1, 1]])] * 2)
    with pytest.raises(ValueError, match="cam_curve_interval"):
        BoxAccuracy(cam_curve_interval=0.0)


def make_batch(seed, count=12):
    """Smooth maps with GT boxes near their peaks, and predictions/labels."""
    rng = np.random.default_rng(seed)
    maps = normalize_scoremaps([rng.random((7, 7)) for _ in range(count)])
    boxes = []
    for scoremap in maps:
        y, x = np.unravel_index(np.argmax(scoremap), scoremap.shape)
        half_w, half_h = rng.integers(10, 60, size=2)
        boxes.append(np.array([[max(x - half_w, 0), max(y - half_h, 0), min(x + half_w, 223), min(y + half_h, 223)]]))
    labels = rng.integers(0, 3, count)
    predictions = np.where(rng.random(count) < 0.6, labels, (labels + 1) % 3)
    return maps, boxes, predictions, labels


def test_box_accuracy_numbers_follow_the_correctness_matrix():
    maps, boxes, predictions, labels = make_batch(1)
    metric = BoxAccuracy(cam_curve_interval=0.01)
    metric.update(maps, boxes, predictions, labels)
    result = metric.compute()
    correct = reference_best_box_iou(maps, boxes, 0.01)[:, None, :] >= np.array([0.3, 0.5, 0.7])[None, :, None]
    curves = correct.mean(axis=0) * 100
    np.testing.assert_allclose(result["curves"], curves, rtol=0, atol=1e-12)
    for j, delta in enumerate((30, 50, 70)):
        best_k = int(np.argmax(curves[j]))
        assert result["max_box_acc"][delta] == pytest.approx(curves[j].max(), abs=1e-12)
        assert result["best_threshold_index"][delta] == best_k
        hit = correct[:, j, :] & (predictions == labels)[:, None]
        assert result["top1_loc"][delta] == pytest.approx(hit[:, best_k].mean() * 100, abs=1e-12)
        assert result["top1_loc_max"][delta] == pytest.approx(hit.mean(axis=0).max() * 100, abs=1e-12)
    assert result["max_box_acc_v2"] == pytest.approx(np.mean([result["max_box_acc"][d] for d in (30, 50, 70)]))
    assert result["cls_top1_acc"] == pytest.approx((predictions == labels).mean() * 100)


def test_box_accuracy_v1_is_single_contour_at_iou_50():
    maps, boxes, _, _ = make_batch(2)
    v1 = BoxAccuracy(iou_thresholds=(50,), multi_contour=False)
    v1.update(maps, boxes)
    expected = (reference_best_box_iou(maps, boxes, 0.01, multi_contour=False) >= 0.5).mean(axis=0).max() * 100
    result = v1.compute()
    assert result["max_box_acc"][50] == pytest.approx(expected, abs=1e-12)
    assert "top1_loc" not in result


@pytest.mark.parametrize("interval", [0.01, 0.001])
def test_shards_merged_equal_one_pass(interval):
    maps, boxes, predictions, labels = make_batch(3, count=10)
    whole = BoxAccuracy(interval)
    whole.update(maps, boxes, predictions, labels)
    shards = [BoxAccuracy(interval) for _ in range(3)]
    for shard, part in zip(shards, np.array_split(np.arange(10), 3)):
        for i in part:  # one image at a time, as an eval loop might
            shard.update(maps[i:i + 1], [boxes[i]], predictions[i:i + 1], labels[i:i + 1])
    merged = BoxAccuracy(interval).merge(shards[0]).merge(shards[1]).merge(shards[2])
    via_state = BoxAccuracy(interval)  # the all-reduce route: sum the state dicts
    via_state.load_state_dict({name: sum(s.state_dict()[name] for s in shards) for name in whole.state_dict()})
    for combined in (merged, via_state):
        for name, value in whole.state_dict().items():
            np.testing.assert_array_equal(combined.state_dict()[name], value)
        a, b = combined.compute(), whole.compute()
        assert a["max_box_acc"] == b["max_box_acc"] and a["top1_loc"] == b["top1_loc"]
    with pytest.raises(ValueError, match="cannot merge"):
        whole.merge(BoxAccuracy(interval, multi_contour=False))
    with pytest.raises(ValueError, match="shape"):
        whole.load_state_dict({**whole.state_dict(), "num_correct": np.zeros((2, 2), np.int64)})


def test_labels_for_some_batches_only_is_an_error():
    maps, boxes, predictions, labels = make_batch(4, count=4)
    metric = BoxAccuracy()
    metric.update(maps[:2], boxes[:2], predictions[:2], labels[:2])
    metric.update(maps[2:], boxes[2:])
    with pytest.raises(RuntimeError, match="labels were given for 2 of 4"):
        metric.compute()
    with pytest.raises(ValueError, match="both pred_classes and labels"):
        metric.update(maps[:1], boxes[:1], predictions[:1])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_map_is_refused_not_zeroed(value):
    """The reference pipeline turns a map with a NaN into zeros (and ±inf into NaN, hence zeros): a broken model
    would get numbers. Here such a map is an error naming it."""
    cam = np.array([[0.0, 1.0], [1.0, 2.0]])
    cam[0, 1] = value
    with pytest.raises(ValueError, match=r"cams\[1\] is not finite"):
        normalize_scoremaps([np.ones((2, 2)), cam])
    good = blank()[None]
    good[0, 3, 4] = value
    with pytest.raises(ValueError, match=r"scoremaps\[0\].*(NaN|inf)"):
        best_box_iou(good, [np.array([[0, 0, 1, 1]])])


@pytest.mark.parametrize("thresholds", [[0.5], [0], [100], [-10], [150], [], [True], ["50"], [30, 50.5]])
def test_iou_thresholds_must_be_integer_percents_inside_0_100(thresholds):
    with pytest.raises(ValueError, match="iou_thresholds must be integer percents in"):
        BoxAccuracy(iou_thresholds=thresholds)
    with pytest.raises(ValueError, match="iou_thresholds must be integer percents in"):
        box_correctness(blank()[None], [np.array([[0, 0, 1, 1]])], iou_thresholds=thresholds)


def test_integer_valued_iou_thresholds_of_any_integer_type_are_accepted():
    assert BoxAccuracy(iou_thresholds=np.array([30, 50, 70])).iou_thresholds == (30, 50, 70)
    assert BoxAccuracy(iou_thresholds=(1, 99)).iou_thresholds == (1, 99)
