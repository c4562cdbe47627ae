"""The fast box path against the OpenCV loop, bit for bit, on thousands of random and adversarial maps.

The oracle runs `cv2.findContours` once per distinct integer threshold θ of each map (the same θ gives the
same mask, hence the same boxes), which keeps this inside the test budget. Most maps are small, and many
have a small peak (max u), which bounds their number of distinct θ while keeping every topology.
"""

import cv2
import numpy as np
import pytest

from calm_fast.metrics import best_box_iou, box_correctness
from calm_fast.metrics.opencv_reference import reference_best_box_iou, reference_box_correctness


def _smooth(rng, height, width):
    low = rng.random((rng.integers(2, 9), rng.integers(2, 9)))
    return cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)


def _plateaus(rng, height, width):
    low = rng.integers(0, rng.integers(2, 6), (rng.integers(2, 8), rng.integers(2, 8))).astype(np.float64)
    return cv2.resize(low, (width, height), interpolation=cv2.INTER_NEAREST)


def _rings(rng, height, width):
    """Nested rectangular and round rings at random levels: holes inside holes, islands inside them."""
    scores = np.zeros((height, width))
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        outer = rng.integers(2, max(3, min(height, width) // 2 + 2))
        thickness = rng.integers(1, 4)
        if rng.random() < 0.5:
            distance = np.maximum(abs(yy - cy), abs(xx - cx))
        else:
            distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2).astype(int)
        ring = (distance <= outer) & (distance > outer - thickness)
        scores[ring] = rng.random()
        if rng.random() < 0.5:
            scores[distance <= rng.integers(0, max(1, outer - thickness))] = rng.random()
    return scores


def _lines(rng, height, width):
    scores = np.zeros((height, width))
    for _ in range(rng.integers(1, 6)):
        length = rng.integers(1, max(height, width) + 1)
        y, x = rng.integers(0, height), rng.integers(0, width)
        dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][rng.integers(4)]
        for step in range(length):
            if 0 <= y + dy * step < height and 0 <= x + dx * step < width:
                scores[y + dy * step, x + dx * step] = rng.random()
    if rng.random() < 0.5:
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        scores[y0:y0 + rng.integers(1, 6), x0:x0 + rng.integers(1, 6)] = rng.random()
    return scores


def _diagonal_touches(rng, height, width):
    """Checkerboard pieces: pixels meeting only at corners (8-connected foreground, 4-connected holes)."""
    yy, xx = np.mgrid[:height, :width]
    board = ((yy + xx) % 2 == 0) & (rng.random((height, width)) < rng.uniform(0.5, 1.0))
    return board * rng.random((height, width)) ** 0.2


def _borders(rng, height, width):
    scores = np.zeros((height, width))
    for _ in range(rng.integers(1, 4)):
        side = rng.integers(4)
        depth = rng.integers(1, 4)
        value = rng.random()
        if side == 0:
            scores[:depth] = value
        elif side == 1:
            scores[-depth:] = value
        elif side == 2:
            scores[:, :depth] = value
        else:
            scores[:, -depth:] = value
    scores[rng.integers(0, height), rng.integers(0, width)] = 0.0
    return scores


def _constant(rng, height, width):
    return np.full((height, width), rng.choice([0.0, 1.0, rng.random()]))


def _noise(rng, height, width):
    return rng.random((height, width))


def _sparse_pixels(rng, height, width):
    """Isolated pixels and pairs: many equal contour areas (0), OpenCV's tie order decides."""
    return (rng.random((height, width)) < rng.uniform(0.01, 0.2)) * rng.integers(1, 4, (height, width)) / 3


def _binary(rng, height, width):
    return (rng.random((height, width)) < rng.uniform(0.3, 0.7)).astype(np.float64)


KINDS = [_smooth, _plateaus, _rings, _lines, _diagonal_touches, _borders, _constant, _noise, _sparse_pixels,
         _binary]


def _to_scoremap(rng, scores, peak):
    """Quantise to uint8 levels 0..peak and return a score map whose s * 255 truncates to those levels."""
    span = scores.max() - scores.min()
    unit = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
    levels = np.floor(unit * peak + rng.random() * (span > 0)).clip(0, peak)
    scoremap = np.where(levels >= 255, 1.0, (levels + 0.5) / 255)
    if rng.random() < 0.1:  # exact 0 and 1, as a normalised map has (and a peak of 255)
        scoremap = np.where(levels >= peak, 1.0, np.where(levels == 0, 0.0, scoremap))
    return scoremap


def _gt_boxes(rng, scoremap):
    """1-3 GT boxes: some around the foreground at a random level (high IoUs), some random."""
    height, width = scoremap.shape
    boxes = []
    for _ in range(rng.integers(1, 4)):
        foreground = scoremap > rng.random() * scoremap.max()
        if foreground.any() and rng.random() < 0.7:
            ys, xs = np.nonzero(foreground)
            box = [xs.min(), ys.min(), xs.max() + rng.integers(0, 2), ys.max() + rng.integers(0, 2)]
            box = [v + rng.integers(-1, 2) * (rng.random() < 0.3) for v in box]
        else:
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            box = [x0, y0, rng.integers(x0, width), rng.integers(y0, height)]
        x0, y0, x1, y1 = box
        x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
        boxes.append([x0, y0, min(max(x1, x0), width - 1), min(max(y1, y0), height - 1)])
    return np.array(boxes, np.int64)


def _batch(seed, count, shape_range, peak_range, kinds=KINDS):
    """Maps of one shape (the metric API takes [N, H, W]) of the given kinds in turn, with their GT boxes."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(*shape_range, size=2))
    maps, boxes = [], []
    for i in range(count):
        scores = kinds[(seed + i) % len(kinds)](rng, height, width)
        scoremap = _to_scoremap(rng, scores, int(rng.integers(*peak_range)))
        maps.append(scoremap)
        boxes.append(_gt_boxes(rng, scoremap))
    return np.stack(maps), boxes


# (batches, maps per batch, side range, peak range, kinds): 2,115 maps in all. OpenCV is slow on large
# noisy maps (~5 ms per threshold), so full-range 224 x 224 maps are the smooth, realistic kind.
SUITES = {
    "small-low-peak": (80, 20, (3, 33), (1, 24), KINDS),
    "small-full-range": (25, 15, (3, 25), (200, 256), KINDS),
    "mid-size": (10, 12, (40, 97), (1, 40), KINDS),
    "224-low-peak": (1, 10, (224, 225), (1, 40), KINDS),
    "224-smooth": (1, 10, (224, 225), (255, 256), [_smooth]),
}


# The two largest suites (~14 s each on the 2-core machine) run under `make test`, not in the dev loop.
@pytest.mark.parametrize("suite", [pytest.param(name, marks=pytest.mark.slow) if name.startswith("small-") else name
                                   for name in SUITES])
def test_fast_path_matches_opencv_loop(suite):
    batches, count, shape_range, peak_range, kinds = SUITES[suite]
    for batch in range(batches):
        maps, boxes = _batch(1000 * list(SUITES).index(suite) + batch, count, shape_range, peak_range, kinds)
        for multi_contour in (True, False):
            for interval in (0.01, 0.001):
                fast = best_box_iou(maps, boxes, interval, multi_contour, num_threads=1)
                oracle = reference_best_box_iou(maps, boxes, interval, multi_contour, distinct_levels_only=True)
                mismatch = np.nonzero((fast != oracle).any(axis=1))[0]
                assert mismatch.size == 0, (f"{suite} batch {batch} multi_contour={multi_contour} "
                                            f"interval={interval}: maps {mismatch.tolist()} differ")


def test_correctness_matrix_and_threads_match():
    maps, boxes = _batch(7, 24, (60, 61), (1, 256))
    for multi_contour in (True, False):
        expected = reference_box_correctness(maps, boxes, 0.01, (30, 50, 70), multi_contour, distinct_levels_only=True)
        for num_threads in (1, 2, None):
            got = box_correctness(maps, boxes, 0.01, (30, 50, 70), multi_contour, num_threads)
            assert got.dtype == bool and got.shape == (24, 3, 100)
            np.testing.assert_array_equal(got, expected)


def test_distinct_levels_shortcut_equals_the_plain_loop():
    maps, boxes = _batch(11, 10, (20, 21), (1, 256))
    for multi_contour in (True, False):
        np.testing.assert_array_equal(
            reference_best_box_iou(maps, boxes, 0.01, multi_contour, distinct_levels_only=True),
            reference_best_box_iou(maps, boxes, 0.01, multi_contour))
