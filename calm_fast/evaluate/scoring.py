"""Scoring one map source on a split: the evaluation settings, `MapMetrics` (the exact, mergeable integer
metric state of one map: MaxBoxAcc v1 and V2, top-1 localization, PxAP, classification counts and the
per-class breakdown, all built on the accumulators of `calm_fast.metrics`) and the cross-rank reduction
that sums those states with one int64 all_reduce, so W ranks give exactly the one-process numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calm_fast.config import Config
from calm_fast.distributed import all_reduce_sum
from calm_fast.metrics import BoxAccuracy, PixelAP, check_iou_thresholds

V1_IOU = 50  # MaxBoxAcc (v1) is IoU 0.5 with the largest contour only


@dataclass(frozen=True)
class EvalSettings:
    """What to measure and what to keep. `from_config` reads the `[eval]` section."""

    cam_curve_interval: float = 0.001  # the reference evaluator's grid (CALM.md §3)
    iou_thresholds: tuple[int, ...] = (30, 50, 70)
    multi_contour: bool = True  # MaxBoxAccV2's box rule; False scores every δ with the largest contour only
    per_class: bool = True  # keep one metric state per class (the per-class breakdown)
    overlay_count: int = 0  # keep the maps of the split's first n images for the overlay grid
    save_maps: bool = False  # keep every raw map of this rank (for maps/rank<r>.npz)
    wsol: bool = True  # the WSOL metrics; False when only other benchmarks (cue localization) are asked for

    def __post_init__(self):
        if not 0.0 < self.cam_curve_interval < 1.0:
            raise ValueError(f"cam_curve_interval must lie in (0, 1), got {self.cam_curve_interval}")
        object.__setattr__(self, "iou_thresholds", check_iou_thresholds(self.iou_thresholds))
        if self.overlay_count < 0:
            raise ValueError(f"overlay_count must be >= 0, got {self.overlay_count}")

    @classmethod
    def from_config(cls, cfg: Config, **changes) -> "EvalSettings":
        return cls(cam_curve_interval=cfg.eval.cam_curve_interval, iou_thresholds=tuple(cfg.eval.iou_thresholds),
                   multi_contour=cfg.eval.multi_contour, **changes)


def as_numpy(array) -> np.ndarray:
    """A numpy copy of a tensor (bf16 as fp32: numpy has no bf16) or array."""
    if isinstance(array, torch.Tensor):
        array = array.detach()
        return (array.float() if array.is_floating_point() else array).cpu().numpy()  # numpy has no bf16
    return np.asarray(array)


class MapMetrics:
    """The exact, mergeable metric state of one map over (a shard of) a split.

    The split's numbers come from the metrics' own accumulators: `BoxAccuracy` twice (MaxBoxAccV2 with
    the settings' IoU thresholds and contour rule; MaxBoxAcc v1: IoU 0.5, largest contour) when the split
    has boxes, `PixelAP` when it has masks. The per-class breakdown adds, per class, the box-correct and
    top-1-correct counts [class, IoU, τ] (from the per-image correctness that `BoxAccuracy.update`
    returns) and one `PixelAP` per class. Everything is integer counts, summed across ranks.
    """

    def __init__(self, split, settings: EvalSettings, classifies: bool):
        self.settings = settings
        self.classifies = classifies
        self.num_classes = split.num_classes
        interval = settings.cam_curve_interval
        has_boxes, has_masks = split.boxes is not None, split.masks is not None
        self.box_v2 = BoxAccuracy(interval, settings.iou_thresholds, settings.multi_contour) if has_boxes else None
        self.box_v1 = BoxAccuracy(interval, (V1_IOU,), multi_contour=False) if has_boxes else None
        self.pixel = PixelAP(interval) if has_masks else None
        # [class, (images, correct predictions)]: tiny, so always kept per class.
        self.class_counts = np.zeros((self.num_classes, 2), np.int64)
        self.class_box_correct = self.class_top1_correct = self.class_pixel = None
        if settings.per_class and has_boxes:
            shape = (self.num_classes, *self.box_v2.num_correct.shape)
            self.class_box_correct = np.zeros(shape, np.int64)
            self.class_top1_correct = np.zeros(shape, np.int64)
        if settings.per_class and has_masks:
            self.class_pixel = [PixelAP(interval) for _ in range(self.num_classes)]

    def update(self, scoremaps: np.ndarray, labels: np.ndarray, pred_classes: np.ndarray | None,
               gt_boxes: list[np.ndarray] | None, gt_masks: np.ndarray | None) -> None:
        """Add normalised maps [B,224,224] with their labels, predictions (or None) and ground truth."""
        np.add.at(self.class_counts[:, 0], labels, 1)
        class_correct = None
        if pred_classes is not None:
            class_correct = pred_classes == labels
            np.add.at(self.class_counts[:, 1], labels, class_correct.astype(np.int64))
        if self.box_v2 is not None:
            known = {} if pred_classes is None else {"pred_classes": pred_classes, "labels": labels}
            correct = self.box_v2.update(scoremaps, gt_boxes, **known)  # bool [B, IoU, τ]
            self.box_v1.update(scoremaps, gt_boxes, **known)
            if self.class_box_correct is not None:
                np.add.at(self.class_box_correct, labels, correct.astype(np.int64))
                if class_correct is not None:
                    np.add.at(self.class_top1_correct, labels, (correct & class_correct[:, None, None]).astype(np.int64))
        if self.pixel is not None:
            self.pixel.update(scoremaps, gt_masks)
            if self.class_pixel is not None:
                for label in np.unique(labels):
                    rows = labels == label
                    self.class_pixel[label].update(scoremaps[rows], gt_masks[rows])

    # -- state: named int64 arrays, the same names and shapes on every rank

    def state(self) -> dict[str, np.ndarray]:
        state = {"class_counts": self.class_counts}
        for name in ("box_v2", "box_v1", "pixel"):
            accumulator = getattr(self, name)
            if accumulator is not None:
                state.update({f"{name}/{key}": value for key, value in accumulator.state_dict().items()})
        if self.class_box_correct is not None:
            state["class_box_correct"] = self.class_box_correct
            state["class_top1_correct"] = self.class_top1_correct
        if self.class_pixel is not None:
            per_class = [pixel.state_dict() for pixel in self.class_pixel]
            state.update({f"class_pixel/{key}": np.stack([s[key] for s in per_class]) for key in per_class[0]})
        return state

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        def section(prefix: str) -> dict[str, np.ndarray]:
            return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}

        self.class_counts = np.asarray(state["class_counts"], np.int64)
        for name in ("box_v2", "box_v1", "pixel"):
            accumulator = getattr(self, name)
            if accumulator is not None:
                accumulator.load_state_dict(section(f"{name}/"))
        if self.class_box_correct is not None:
            self.class_box_correct = np.asarray(state["class_box_correct"], np.int64)
            self.class_top1_correct = np.asarray(state["class_top1_correct"], np.int64)
        if self.class_pixel is not None:
            stacked = section("class_pixel/")
            for label, pixel in enumerate(self.class_pixel):
                pixel.load_state_dict({key: value[label] for key, value in stacked.items()})

    # -- numbers

    def results(self) -> dict[str, Any]:
        """The split's metrics and (per_class) the breakdown, from the (summed) state."""
        images, correct = (int(v) for v in self.class_counts.sum(axis=0))
        out: dict[str, Any] = {"num_images": images,
                               "cls_top1_acc": 100.0 * correct / images if self.classifies and images else None,
                               "box": self._box_results() if self.box_v2 is not None and images else None,
                               "mask": _pxap(self.pixel) if self.pixel is not None and images else None}
        if self.settings.per_class:
            out["per_class"] = self._per_class(out["box"])
        return out

    def _box_results(self) -> dict[str, Any]:
        v2, v1 = self.box_v2.compute(), self.box_v1.compute()
        thresholds = v2["thresholds"]
        ious = self.box_v2.iou_thresholds
        result = {
            "max_box_acc": v1["max_box_acc"][V1_IOU],
            "max_box_acc_v2": v2["max_box_acc_v2"],
            "max_box_acc_per_iou": {str(t): v2["max_box_acc"][t] for t in ious},
            "best_threshold": {str(t): float(thresholds[v2["best_threshold_index"][t]]) for t in ious},
            "top1_loc": None, "top1_loc_max": None, "top1_loc_v2": None,
            "v1": {"best_threshold": float(thresholds[v1["best_threshold_index"][V1_IOU]]),
                   "top1_loc": None, "top1_loc_max": None},
            "thresholds": thresholds,
            "curves": {str(t): v2["curves"][j] for j, t in enumerate(ious)},
            "v1_curve": v1["curves"][0],
        }
        if "top1_loc" in v2:  # the source classifies
            result["top1_loc"] = {str(t): v2["top1_loc"][t] for t in ious}
            result["top1_loc_max"] = {str(t): v2["top1_loc_max"][t] for t in ious}
            result["top1_loc_v2"] = float(np.mean(list(v2["top1_loc"].values())))
            result["v1"]["top1_loc"] = v1["top1_loc"][V1_IOU]
            result["v1"]["top1_loc_max"] = v1["top1_loc_max"][V1_IOU]
        return result

    def _per_class(self, box: dict | None) -> list[dict[str, Any]]:
        """One row per class with images. Box accuracies are read at the thresholds that are best for
        the whole split (a per-class maximum would choose a threshold per class and flatter each one)."""
        ious = self.settings.iou_thresholds
        best = None if box is None else [self.box_v2.compute()["best_threshold_index"][t] for t in ious]
        rows = []
        for label in np.flatnonzero(self.class_counts[:, 0]):
            images, correct = (int(v) for v in self.class_counts[label])
            row: dict[str, Any] = {"class": int(label), "num_images": images,
                                   "cls_top1_acc": 100.0 * correct / images if self.classifies else None}
            if best is not None:
                at_best = [100.0 * self.class_box_correct[label, j, k] / images for j, k in enumerate(best)]
                row.update({f"box_acc_{t}": value for t, value in zip(ious, at_best)})
                row["box_acc_v2"] = float(np.mean(at_best))
                row["top1_loc_v2"] = None
                if self.classifies:
                    row["top1_loc_v2"] = float(np.mean([100.0 * self.class_top1_correct[label, j, k] / images
                                                        for j, k in enumerate(best)]))
            if self.class_pixel is not None:
                mask = _pxap(self.class_pixel[label])
                row["pxap"] = mask["pxap"]
            rows.append(row)
        return rows


def _pxap(pixel) -> dict[str, Any]:
    """PixelAP's results; a set without a positive pixel has no PxAP (the reference raises): None."""
    try:
        computed = pixel.compute()
    except RuntimeError as error:
        return {"pxap": None, "error": str(error)}
    return {"pxap": computed["pxap"], "precision": computed["precision"], "recall": computed["recall"]}


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_states(states: list[dict[str, np.ndarray]]) -> list[dict]:
    """Sum integer state dicts element-wise across ranks (one int64 all_reduce); returns the sums.

    Every rank must hold the same names and shapes (it does: the shapes follow from the settings);
    this is checked first, so a mismatch is a clear error instead of silently wrong numbers.
    """
    names = [(i, key) for i, state in enumerate(states) for key in sorted(state)]
    arrays = [np.asarray(states[i][key]) for i, key in names]
    for (_, key), array in zip(names, arrays):
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"metric state {key!r} has dtype {array.dtype}; exact merging needs integers")
    if _world_size() == 1:
        return [{key: np.asarray(value, np.int64) for key, value in state.items()} for state in states]
    layout = [(key, array.shape) for (_, key), array in zip(names, arrays)]
    gathered: list = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, layout)
    for rank, other in enumerate(gathered):
        if other != layout:
            raise RuntimeError(f"metric state layout of rank {rank} differs from this rank's; the ranks were "
                               "started with different settings or splits")
    flat = np.concatenate([array.astype(np.int64).ravel() for array in arrays]) if arrays else np.zeros(0, np.int64)
    flat = all_reduce_sum(torch.from_numpy(flat)).numpy()
    out: list[dict[str, np.ndarray]] = [{} for _ in states]
    offset = 0
    for (i, key), array in zip(names, arrays):
        out[i][key] = flat[offset:offset + array.size].reshape(array.shape)
        offset += array.size
    return out


def gather_to_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a collective)."""
    if _world_size() == 1:
        return [obj]
    gathered: list = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
