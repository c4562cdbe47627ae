"""Box metrics: MaxBoxAcc (v1), MaxBoxAccV2 and top-1 localisation, exact and mergeable (METRICS.md §3).

The per-threshold boxes come from the component-tree kernels in `_component_tree` (every threshold of a
map in one or two sweeps); `opencv_reference` holds the straightforward OpenCV loop they are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from calm_fast.metrics import _component_tree
from calm_fast.metrics.counts import add_counts, load_counts
from calm_fast.metrics.scoremaps import (
    SCOREMAP_SIZE,
    cam_thresholds,
    check_iou_thresholds,
    check_scoremaps,
    integer_thresholds,
    quantize_scoremaps,
)


def rescale_boxes(boxes: np.ndarray | Sequence, image_size: Sequence[float],
                  target_size: int = SCOREMAP_SIZE) -> np.ndarray:
    """Map (x0, y0, x1, y1) boxes from a W x H image to the target x target score-map frame.

    Each coordinate is scaled as `x * target / W` in float and truncated with `int()`, as the reference does.
    `image_size` is (width, height). Returns int64 [k, 4].
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [k, 4] (x0, y0, x1, y1), got {boxes.shape}")
    width, height = (float(v) for v in image_size)
    if not (width > 0 and height > 0):
        raise ValueError(f"image_size must be a positive (width, height), got {tuple(image_size)}")
    _check_box_order(boxes, "boxes")
    scale = np.array([target_size, target_size, target_size, target_size], np.float64)
    frame = np.array([width, height, width, height])
    return np.trunc(boxes * scale / frame).astype(np.int64)


def _check_box_order(boxes: np.ndarray, name: str) -> None:
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        raise ValueError(f"{name}: box {boxes[np.argmax(bad)].tolist()} has x1 < x0 or y1 < y0 "
                         f"(expected x0, y0, x1, y1 with inclusive ends)")


def _pack_gt_boxes(gt_boxes: Sequence, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-image GT boxes into int64 [sum k, 4] plus offsets [count + 1], validating them."""
    if len(gt_boxes) != count:
        raise ValueError(f"got {count} score maps but {len(gt_boxes)} GT box lists")
    packed, offsets = [], [0]
    for i, boxes in enumerate(gt_boxes):
        boxes = np.asarray(boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
            raise ValueError(f"gt_boxes[{i}] must have shape [k >= 1, 4], got {boxes.shape}")
        if not np.array_equal(boxes, np.trunc(boxes)):
            raise ValueError(f"gt_boxes[{i}] must hold integer pixel coordinates of the score-map frame "
                             f"(use rescale_boxes), got {boxes.tolist()}")
        boxes = boxes.astype(np.int64)
        _check_box_order(boxes, f"gt_boxes[{i}]")
        packed.append(boxes)
        offsets.append(offsets[-1] + len(boxes))
    return np.concatenate(packed), np.asarray(offsets, np.int64)


def best_box_iou(scoremaps: Sequence | np.ndarray, gt_boxes: Sequence[np.ndarray],
                 cam_curve_interval: float = 0.001, multi_contour: bool = True,
                 num_threads: int | None = None) -> np.ndarray:
    """best[i, k]: max IoU between the boxes of map i at threshold τ_k and its GT boxes. float64 [N, T].

    scoremaps: [N, H, W] in [0, 1] (224 x 224 for the reference protocol); gt_boxes: one int [k, 4] array
    per map, (x0, y0, x1, y1) with inclusive ends in the score-map frame. `multi_contour=True` scores every
    contour (holes included), False only the largest by `cv2.contourArea`. `num_threads`: numba threads
    over maps (None: numba's default, i.e. all cores; 1: the serial kernel).
    """
    maps = check_scoremaps(scoremaps)
    thresholds = cam_thresholds(cam_curve_interval)
    if len(maps) == 0:
        return np.zeros((0, len(thresholds)), np.float64)
    packed, offsets = _pack_gt_boxes(gt_boxes, len(maps))
    quantized = np.ascontiguousarray(quantize_scoremaps(maps))
    levels = integer_thresholds(quantized, thresholds)
    per_level = _per_level_best_iou(quantized, packed, offsets, bool(multi_contour), num_threads)
    return np.take_along_axis(per_level, levels, axis=1)


def _per_level_best_iou(quantized: np.ndarray, packed: np.ndarray, offsets: np.ndarray, multi_contour: bool,
                    num_threads: int | None) -> np.ndarray:
    if num_threads == 1 or len(quantized) <= 1:
        return _component_tree.level_best_iou_serial(quantized, packed, offsets, multi_contour)
    if num_threads is None:
        return _component_tree.level_best_iou_parallel(quantized, packed, offsets, multi_contour)
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    previous = numba.get_num_threads()
    numba.set_num_threads(min(num_threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _component_tree.level_best_iou_parallel(quantized, packed, offsets, multi_contour)
    finally:
        numba.set_num_threads(previous)


def box_correctness(scoremaps: Sequence | np.ndarray, gt_boxes: Sequence[np.ndarray],
                    cam_curve_interval: float = 0.001, iou_thresholds: Sequence[int] = (30, 50, 70),
                    multi_contour: bool = True, num_threads: int | None = None) -> np.ndarray:
    """correct[i, j, k] = best IoU of map i at τ_k >= iou_thresholds[j] / 100. bool [N, J, T]."""
    iou_thresholds = check_iou_thresholds(iou_thresholds)
    best = best_box_iou(scoremaps, gt_boxes, cam_curve_interval, multi_contour, num_threads)
    return _correctness(best, iou_thresholds)


def _correctness(best: np.ndarray, iou_thresholds: Sequence[int]) -> np.ndarray:
    # delta / 100 as a Python float, compared with >=: an IoU of exactly 0.3, 0.5 or 0.7 counts.
    return np.stack([best >= delta / 100 for delta in iou_thresholds], axis=1)


class BoxAccuracy:
    """Accumulates MaxBoxAcc / MaxBoxAccV2 (and top-1 localisation when labels are given) over a split.

    MaxBoxAccV2 (the default) is `multi_contour=True`, IoU thresholds (30, 50, 70); MaxBoxAcc (v1) is the
    IoU-50 entry with `multi_contour=False`. The state is integer counts only, so shards accumulated on
    different ranks and summed (`merge`, or an all-reduce of `state_dict()`) give exactly the one-pass result.
    `num_threads`: numba threads over the maps of a batch (None: all cores; 1 when ranks share a node).
    """

    def __init__(self, cam_curve_interval: float = 0.001, iou_thresholds: Sequence[int] = (30, 50, 70),
                 multi_contour: bool = True, num_threads: int | None = None):
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = cam_thresholds(self.cam_curve_interval)
        self.iou_thresholds = check_iou_thresholds(iou_thresholds)
        self.multi_contour = bool(multi_contour)
        self.num_threads = num_threads
        self.reset()

    def reset(self) -> None:
        shape = (len(self.iou_thresholds), len(self.thresholds))
        self.num_images = np.zeros((), np.int64)
        self.num_correct = np.zeros(shape, np.int64)  # GT-known: box correct at (δ, τ)
        self.num_labelled = np.zeros((), np.int64)
        self.num_top1_correct = np.zeros(shape, np.int64)  # box correct and class correct
        self.num_class_correct = np.zeros((), np.int64)

    def update(self, scoremaps: Sequence | np.ndarray, gt_boxes: Sequence[np.ndarray],
               pred_classes: Sequence[int] | np.ndarray | None = None,
               labels: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Add a batch: maps [B, H, W] in [0, 1], GT boxes per map in the map frame, optional predictions
        and labels [B] for top-1 localisation. Returns the batch's correctness bool [B, J, T]."""
        correct = box_correctness(scoremaps, gt_boxes, self.cam_curve_interval, self.iou_thresholds,
                                  self.multi_contour, self.num_threads)
        if (pred_classes is None) != (labels is None):
            raise ValueError("pass both pred_classes and labels for top-1 localisation, or neither")
        self.num_images += len(correct)
        self.num_correct += correct.sum(axis=0)
        if labels is not None:
            pred_classes = np.asarray(pred_classes).reshape(-1)
            labels = np.asarray(labels).reshape(-1)
            if len(pred_classes) != len(correct) or len(labels) != len(correct):
                raise ValueError(f"got {len(correct)} maps but {len(pred_classes)} pred_classes "
                                 f"and {len(labels)} labels")
            class_correct = pred_classes == labels
            self.num_labelled += len(correct)
            self.num_class_correct += int(class_correct.sum())
            self.num_top1_correct += (correct & class_correct[:, None, None]).sum(axis=0)
        return correct

    def _check_compatible(self, other: "BoxAccuracy") -> None:
        mine = (self.cam_curve_interval, self.iou_thresholds, self.multi_contour)
        theirs = (other.cam_curve_interval, other.iou_thresholds, other.multi_contour)
        if mine != theirs:
            raise ValueError(f"cannot merge BoxAccuracy with settings {theirs} into {mine}")

    def merge(self, other: "BoxAccuracy") -> "BoxAccuracy":
        """Add another accumulator's counts (same settings) into this one; returns self."""
        self._check_compatible(other)
        add_counts(self, other)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The exact state as int64 arrays; summing it over ranks merges the shards."""
        return {"num_images": self.num_images.copy(), "num_correct": self.num_correct.copy(),
                "num_labelled": self.num_labelled.copy(), "num_top1_correct": self.num_top1_correct.copy(),
                "num_class_correct": self.num_class_correct.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state with `state` (e.g. all-reduced tensors or arrays of the same shapes)."""
        load_counts(self, state, self.state_dict())

    def compute(self) -> dict:
        """Curves and maxima, in percent. Keys: `thresholds` (τ grid), `iou_thresholds`, `curves`
        [J, T], `max_box_acc` {δ: value}, `max_box_acc_v2` (mean over δ), `best_threshold_index` {δ: k},
        `num_images`; with labels also `top1_loc` {δ: at the best GT-known τ}, `top1_loc_max` {δ},
        `top1_curves` [J, T] and `cls_top1_acc`."""
        count = int(self.num_images)
        if count == 0:
            raise RuntimeError("BoxAccuracy.compute() called before any update()")
        curves = self.num_correct * 100.0 / float(count)
        best_index = np.argmax(curves, axis=1)  # first maximum
        maxima = [float(curve.max()) for curve in curves]
        result = {
            "thresholds": self.thresholds.copy(),
            "iou_thresholds": self.iou_thresholds,
            "curves": curves,
            "max_box_acc": dict(zip(self.iou_thresholds, maxima)),
            "max_box_acc_v2": float(np.average(maxima)),
            "best_threshold_index": dict(zip(self.iou_thresholds, (int(k) for k in best_index))),
            "num_images": count,
        }
        labelled = int(self.num_labelled)
        if labelled == count:
            top1_curves = self.num_top1_correct * 100.0 / float(count)
            result["top1_curves"] = top1_curves
            result["top1_loc"] = {delta: float(top1_curves[j, best_index[j]])
                                  for j, delta in enumerate(self.iou_thresholds)}
            result["top1_loc_max"] = {delta: float(top1_curves[j].max())
                                      for j, delta in enumerate(self.iou_thresholds)}
            result["cls_top1_acc"] = float(self.num_class_correct) * 100.0 / float(count)
        elif labelled:
            raise RuntimeError(f"labels were given for {labelled} of {count} images; top-1 localisation "
                               f"needs them for all or none")
        return result
