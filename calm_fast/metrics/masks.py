"""PxAP, the pixel-wise average precision of OpenImages-style masks, exact and mergeable (METRICS.md §4)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numba
import numpy as np

from calm_fast.errors import InputFileError
from calm_fast.metrics.counts import add_counts, load_counts
from calm_fast.metrics.scoremaps import SCOREMAP_SIZE, cam_thresholds, check_scoremaps

IGNORE = 255  # value of an ignored pixel in a GT mask; 1 is foreground, 0 background


def _read_binary_mask(path: str | os.PathLike, size: int, as_float: bool) -> np.ndarray:
    name = os.fspath(path)
    image = cv2.imread(name, cv2.IMREAD_UNCHANGED)
    if image is None:
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: mask image not found")
        raise InputFileError(f"{name}: cannot decode the mask image")
    if image.dtype != np.uint8:
        # A grayscale read scales 16 bits down to 8, so a 0/1 mask of 16 bits would become all background.
        raise InputFileError(f"{name}: a {image.dtype} mask image; masks are 8-bit grayscale (> 0 is foreground)")
    if image.ndim == 3:  # colour: the reference's grayscale conversion, as it reads every mask
        image = cv2.imread(name, cv2.IMREAD_GRAYSCALE)
    if as_float:  # the reference reads instance masks as float32, the ignore mask as uint8
        image = image.astype(np.float32)
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST) > 0.5


def load_gt_mask(mask_paths: Sequence[str | os.PathLike], ignore_path: str | os.PathLike | None = None,
                 size: int = SCOREMAP_SIZE) -> np.ndarray:
    """GT mask uint8 [size, size] of one image: 1 on any instance, 255 on ignored pixels, 0 elsewhere.

    Each grayscale PNG is resized with nearest neighbour and thresholded at > 0.5; the instances are
    united, and ignore = ignore-PNG AND NOT foreground.
    """
    if len(mask_paths) == 0:
        raise ValueError("load_gt_mask needs at least one instance mask path")
    foreground = np.zeros((size, size), bool)
    for path in mask_paths:
        foreground |= _read_binary_mask(path, size, as_float=True)
    gt = foreground.astype(np.uint8)
    if ignore_path is not None:
        ignore = _read_binary_mask(ignore_path, size, as_float=False) & ~foreground
        gt[ignore] = IGNORE
    return gt


@numba.njit(cache=True, nogil=True)
def _accumulate_histograms(scoremaps, masks, edges, positive, negative):
    """Add each pixel's score to the positive (mask 1) or negative (mask 0) histogram; 255 is dropped.

    Bins are numpy.histogram's: [e_j, e_j+1) and the last one closed; scores outside [e_0, e_last] drop.
    """
    num_bins = edges.size - 1
    step = edges[1] - edges[0] if num_bins > 3 else 1.0
    for i in range(scoremaps.shape[0]):
        for y in range(scoremaps.shape[1]):
            for x in range(scoremaps.shape[2]):
                label = masks[i, y, x]
                score = scoremaps[i, y, x]
                if (label != 0 and label != 1) or score < edges[0] or score > edges[num_bins]:
                    continue
                j = min(max(int((score - edges[0]) / step), 0), num_bins - 1)  # a guess, fixed up below
                while j > 0 and edges[j] > score:
                    j -= 1
                while j < num_bins - 1 and edges[j + 1] <= score:
                    j += 1
                if label == 1:
                    positive[j] += 1
                else:
                    negative[j] += 1


class PixelAP:
    """Accumulates PxAP over a split: integer score histograms of GT-positive and GT-negative pixels.

    Histograms are pooled over all images (PxAP is not a mean of per-image APs), so summing the state of
    shards (`merge`, or an all-reduce of `state_dict()`) gives exactly the one-pass result.
    """

    def __init__(self, cam_curve_interval: float = 0.001):
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = cam_thresholds(self.cam_curve_interval)
        # Bins [t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3]: a score of exactly 1.0 is the "≥ 1" point.
        self.edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.reset()

    def reset(self) -> None:
        self.num_images = np.zeros((), np.int64)
        self.positive_hist = np.zeros(len(self.edges) - 1, np.int64)
        self.negative_hist = np.zeros(len(self.edges) - 1, np.int64)

    def update(self, scoremaps: Sequence | np.ndarray, gt_masks: Sequence | np.ndarray) -> None:
        """Add a batch: maps [B, H, W] in [0, 1] and uint8 GT masks [B, H, W] (0, 1, 255 = ignore)."""
        maps = check_scoremaps(scoremaps)
        masks = np.asarray(gt_masks)
        if masks.shape != maps.shape:
            raise ValueError(f"gt_masks shape {masks.shape} does not match scoremaps shape {maps.shape}")
        if not np.issubdtype(masks.dtype, np.integer) or (masks.size and (masks.min() < 0 or masks.max() > 255)):
            raise TypeError(f"gt_masks must be uint8-valued integers (0, 1, 255 = ignore), got dtype "
                            f"{masks.dtype}")
        # Any other value would be skipped by the histograms without a word.
        unknown = (masks != 0) & (masks != 1) & (masks != IGNORE)
        if unknown.any():
            i = int(np.argmax(unknown.any(axis=(1, 2))))
            raise ValueError(f"gt_masks[{i}] holds the value {int(masks[i][unknown[i]][0])}: GT masks hold only "
                             f"0 (background), 1 (foreground) and {IGNORE} (ignore), as load_gt_mask makes them")
        _accumulate_histograms(np.ascontiguousarray(maps), np.ascontiguousarray(masks, dtype=np.uint8),
                               self.edges, self.positive_hist, self.negative_hist)
        self.num_images += len(maps)

    def merge(self, other: "PixelAP") -> "PixelAP":
        """Add another accumulator's histograms (same threshold grid) into this one; returns self."""
        if other.cam_curve_interval != self.cam_curve_interval:
            raise ValueError(f"cannot merge PixelAP with cam_curve_interval {other.cam_curve_interval} "
                             f"into {self.cam_curve_interval}")
        add_counts(self, other)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The exact state as int64 arrays; summing it over ranks merges the shards."""
        return {"num_images": self.num_images.copy(), "positive_hist": self.positive_hist.copy(),
                "negative_hist": self.negative_hist.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state with `state` (e.g. all-reduced tensors or arrays of the same shapes)."""
        load_counts(self, state, self.state_dict())

    def compute(self) -> dict:
        """`pxap` (percent), `precision` and `recall` [T+2] (index 0: score ≥ 2, 1: ≥ 1.0, then down the
        grid to ≥ 0), `thresholds`. A right-endpoint step sum from recall 0; NaN precisions are skipped.
        Raises RuntimeError if the set has no positive pixel, as the reference does."""
        return {**pxap_from_histograms(self.positive_hist, self.negative_hist), "thresholds": self.thresholds.copy()}


def pxap_from_histograms(positive_hist: np.ndarray, negative_hist: np.ndarray) -> dict:
    """PxAP of ascending score histograms of positive and negative pixels (METRICS.md §4).

    Returns `pxap` (percent), `precision` and `recall` (from the top bin down: index j counts the pixels
    of the top j + 1 bins). Raises RuntimeError when there is no positive pixel, as the reference does.
    """
    positive = np.asarray(positive_hist, np.float64)
    negative = np.asarray(negative_hist, np.float64)
    tp = positive[::-1].cumsum()
    fp = negative[::-1].cumsum()
    fn = positive.sum() - tp
    if ((tp + fn) <= 0).all():
        raise RuntimeError("No positive ground truth in the eval set.")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    terms = precision[1:] * np.diff(recall)
    return {"pxap": float(terms[~np.isnan(terms)].sum() * 100), "precision": precision, "recall": recall}
