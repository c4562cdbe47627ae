"""The straightforward evaluator: one OpenCV contour search per image and threshold (METRICS.md §3-§4).

This is the test oracle and the benchmark baseline for the fast path in `calm_fast.metrics.boxes`; it is
never the default. It follows the public reference evaluator step by step: `cv2.threshold`,
`cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)`, `cv2.boundingRect` / `cv2.contourArea`, inclusive-end
IoU, and `np.histogram` for PxAP.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calm_fast.metrics.contours import contour_boxes
from calm_fast.metrics.scoremaps import cam_thresholds, check_scoremaps, integer_thresholds, quantize_scoremaps


def iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU [len(a), len(b)] with inclusive box ends; a denominator <= 0 gives 0."""
    a = np.asarray(boxes_a, np.int64)[:, None, :]
    b = np.asarray(boxes_b, np.int64)[None, :, :]
    inter_w = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter_h = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    degenerate = union <= 0
    ious = inter / np.where(degenerate, 1, union)
    ious[degenerate] = 0.0
    return ious


def reference_best_box_iou(scoremaps: Sequence | np.ndarray, gt_boxes: Sequence[np.ndarray],
                           cam_curve_interval: float = 0.001, multi_contour: bool = True,
                           distinct_levels_only: bool = False) -> np.ndarray:
    """best[i, k]: max IoU over the boxes of map i at τ_k and its GT boxes. float64 [N, T].

    `distinct_levels_only=True` runs OpenCV once per distinct integer threshold θ = int(τ·max u) and reuses
    the result for every τ giving the same θ (the same θ gives the same mask, hence the same boxes). Tests
    use it to stay fast; the benchmark baseline runs the plain loop.
    """
    maps = check_scoremaps(scoremaps)
    if len(gt_boxes) != len(maps):
        raise ValueError(f"got {len(maps)} score maps but {len(gt_boxes)} GT box lists")
    thresholds = cam_thresholds(cam_curve_interval)
    quantized = quantize_scoremaps(maps)
    levels = integer_thresholds(quantized, thresholds)
    best = np.empty((len(maps), len(thresholds)), np.float64)
    for i in range(len(maps)):
        seen: dict[int, float] = {}
        for k, level in enumerate(levels[i].tolist()):
            if distinct_levels_only and level in seen:
                best[i, k] = seen[level]
                continue
            boxes = contour_boxes(quantized[i], level, multi_contour)
            best[i, k] = seen[level] = iou_matrix(boxes, gt_boxes[i]).max()
    return best


def reference_box_correctness(scoremaps: Sequence | np.ndarray, gt_boxes: Sequence[np.ndarray],
                              cam_curve_interval: float = 0.001, iou_thresholds: Sequence[int] = (30, 50, 70),
                              multi_contour: bool = True, distinct_levels_only: bool = False) -> np.ndarray:
    """correct[i, j, k] = best IoU of map i at τ_k >= iou_thresholds[j] / 100. bool [N, J, T]."""
    best = reference_best_box_iou(scoremaps, gt_boxes, cam_curve_interval, multi_contour, distinct_levels_only)
    return np.stack([best >= delta / 100 for delta in iou_thresholds], axis=1)


def reference_pxap(scoremaps: Sequence | np.ndarray, gt_masks: Sequence[np.ndarray],
                   cam_curve_interval: float = 0.001) -> dict:
    """PxAP over a whole set, literally: per-image `np.histogram` of positive and negative scores, pooled."""
    maps = check_scoremaps(scoremaps)
    edges = np.append(cam_thresholds(cam_curve_interval), [1.0, 2.0, 3.0])
    positive = np.zeros(len(edges) - 1, np.float64)
    negative = np.zeros(len(edges) - 1, np.float64)
    for scoremap, mask in zip(maps, gt_masks, strict=True):
        positive += np.histogram(scoremap[mask == 1], bins=edges)[0]
        negative += np.histogram(scoremap[mask == 0], bins=edges)[0]
    num_positive = positive.sum()
    tp = positive[::-1].cumsum()
    fn = num_positive - tp
    fp = negative[::-1].cumsum()
    if ((tp + fn) <= 0).all():
        raise RuntimeError("No positive ground truth in the eval set.")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    terms = precision[1:] * np.diff(recall)
    return {"pxap": float(terms[~np.isnan(terms)].sum() * 100), "precision": precision, "recall": recall}
