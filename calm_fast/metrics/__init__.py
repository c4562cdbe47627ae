"""Exact WSOL metrics, as the public reference evaluator computes them (see METRICS.md), but fast.

* `normalize_scoremaps`: CAMs -> 224 x 224 float64 maps in [0, 1] (OpenCV bicubic resize, min-max).
* `rescale_boxes`: GT boxes of the original image -> the 224 frame (float scale, int() truncation).
* `BoxAccuracy`: MaxBoxAcc (v1: `multi_contour=False`, δ = 50), MaxBoxAccV2 (default), top-1 localisation.
* `PixelAP` and `load_gt_mask`: PxAP over OpenImages-style masks.
* `best_box_iou` / `box_correctness`: the per-image, per-threshold values the accumulators sum.

Both accumulators keep integer counts only (`state_dict()` / `load_state_dict()` / `merge()`), so shards
summed across ranks give exactly the single-process numbers. `calm_fast.metrics.opencv_reference` holds the
straightforward OpenCV loop, used as test oracle and benchmark baseline.
"""

from calm_fast.metrics.boxes import BoxAccuracy, best_box_iou, box_correctness, rescale_boxes
from calm_fast.metrics.masks import PixelAP, load_gt_mask
from calm_fast.metrics.scoremaps import cam_thresholds, check_iou_thresholds, normalize_scoremaps

__all__ = [
    "BoxAccuracy",
    "PixelAP",
    "best_box_iou",
    "box_correctness",
    "cam_thresholds",
    "check_iou_thresholds",
    "load_gt_mask",
    "normalize_scoremaps",
    "rescale_boxes",
]
