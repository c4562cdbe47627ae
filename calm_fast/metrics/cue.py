"""Cue-localization PxAP state (CALM.md §4): integer score histograms per class pair, exact and mergeable.

For every class pair (y1, y2) the benchmark scores the map |s_y1 - s_y2| of each test image of either class
against the pixels of the parts in which the two classes differ. `CuePixelAP` keeps one pair of histograms
(positive / negative pixels, over a `ThresholdGrid` of `cue_bins`) per class pair, and counts of the images
scored and skipped. Summing states across ranks merges them exactly. PxAP per pair uses a fresh accumulator
(calm-fast's number) or, on request, the reference's cumulative one (never reset, across groups too), which
is computed from prefix sums of the same per-pair state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from calm_fast.metrics.counts import add_counts, load_counts
from calm_fast.metrics.cue_bins import ThresholdGrid, bin_rows
from calm_fast.metrics.masks import pxap_from_histograms

FRESH_LABEL = "fresh accumulator per class pair (calm-fast)"
CUMULATIVE_LABEL = ("cumulative accumulator: never reset, across pairs and groups in the order group, y1, y2 "
                    "(the reference's number)")


class CuePixelAP:
    """Per-class-pair PxAP state: positive and negative score histograms [P, bins] and image counts [P].

    `pair_groups[p]` is pair p's group (the number of differing parts). The state's pair order is the
    order in which the reference visits pairs (groups ascending, then y1, y2); the cumulative number
    depends on it. Everything is int64 counts: `merge` or an all-reduce of `state_dict()` is exact.
    """

    def __init__(self, pair_groups: Sequence[int] | np.ndarray, grid: ThresholdGrid | None = None):
        self.pair_groups = np.asarray(pair_groups, np.int64)
        if self.pair_groups.ndim != 1 or self.pair_groups.size == 0:
            raise ValueError(f"pair_groups must be a non-empty 1-D sequence, got shape {self.pair_groups.shape}")
        self.grid = grid or ThresholdGrid()
        self.reset()

    @property
    def num_pairs(self) -> int:
        return len(self.pair_groups)

    def reset(self) -> None:
        shape = (self.num_pairs, self.grid.num_bins)
        self.positive_hist = np.zeros(shape, np.int64)
        self.negative_hist = np.zeros(shape, np.int64)
        self.num_images = np.zeros(self.num_pairs, np.int64)  # images scored per pair
        self.num_skipped = np.zeros(self.num_pairs, np.int64)  # images with no visible differing part

    def add_rows(self, row_histograms, row_pair) -> None:
        """Add per-row histograms [R, 2, bins] (from `bin_rows` / `bin_rows_torch`) of rows of pairs `row_pair`."""
        histograms = _as_int64(row_histograms)
        pairs = _as_int64(row_pair)
        self._check_pairs(pairs)
        if histograms.shape != (len(pairs), 2, self.grid.num_bins):
            raise ValueError(f"row histograms must be [{len(pairs)}, 2, {self.grid.num_bins}], got {histograms.shape}")
        np.add.at(self.negative_hist, pairs, histograms[:, 0])
        np.add.at(self.positive_hist, pairs, histograms[:, 1])
        np.add.at(self.num_images, pairs, 1)

    def add_skipped(self, row_pair) -> None:
        """Count images of pairs `row_pair` skipped because none of the pair's differing parts is visible."""
        pairs = _as_int64(row_pair)
        self._check_pairs(pairs)
        np.add.at(self.num_skipped, pairs, 1)

    def update(self, scoremaps, gt_masks, pair_ids) -> None:
        """Add score maps [R, H, W] with binary GT masks [R, H, W] (1 = differing part) of pairs `pair_ids`.

        Scores are taken as float32 (the reference's maps are float32 until its histogram).
        """
        masks = np.asarray(gt_masks)
        if masks.ndim != 3 or not np.isin(masks, (0, 1)).all():
            raise ValueError(f"gt_masks must be [R, H, W] of 0 and 1, got shape {masks.shape}")
        rows = np.arange(len(masks))
        histograms = bin_rows(np.asarray(scoremaps, np.float32), masks.astype(np.uint8), rows,
                              np.full(len(masks), 1 << 1), self.grid)
        self.add_rows(histograms, pair_ids)

    def _check_pairs(self, pairs: np.ndarray) -> None:
        if pairs.size and (pairs.min() < 0 or pairs.max() >= self.num_pairs):
            raise IndexError(f"pair index outside [0, {self.num_pairs})")

    def merge(self, other: "CuePixelAP") -> "CuePixelAP":
        """Add another accumulator's state (same pairs and grid) into this one; returns self."""
        if not (self.grid.same_as(other.grid) and np.array_equal(self.pair_groups, other.pair_groups)):
            raise ValueError("cannot merge CuePixelAP states of different pairs or threshold grids")
        add_counts(self, other)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"positive_hist": self.positive_hist.copy(), "negative_hist": self.negative_hist.copy(),
                "num_images": self.num_images.copy(), "num_skipped": self.num_skipped.copy()}

    def load_state_dict(self, state: dict) -> None:
        load_counts(self, state, self.state_dict())

    # -- numbers

    def pair_pxap(self, cumulative: bool = False) -> list[float | None]:
        """PxAP of each pair (percent); None where it is undefined (no positive pixel, or no scored pixel).

        cumulative=True: pair p's number is that of the histograms of pairs 0..p summed, as the reference's
        accumulator, which is never reset, gives it.
        """
        positive, negative = self.positive_hist, self.negative_hist
        if cumulative:
            positive, negative = positive.cumsum(axis=0), negative.cumsum(axis=0)
        values: list[float | None] = []
        for p in range(self.num_pairs):
            if positive[p].sum() == 0 or positive[p].sum() + negative[p].sum() == 0:
                values.append(None)  # the reference raises here
                continue
            values.append(pxap_from_histograms(positive[p], negative[p])["pxap"])
        return values

    def compute(self, cumulative: bool = False) -> dict:
        """`groups` {g: num_pairs, num_scored, mean_pxap}, `mean_pxap` (pair-weighted over all groups:
        the mean over every scored pair), `pairs` (per pair: group, pxap, num_images, num_skipped),
        `accumulator` (which number this is) and `grid`. Pairs whose PxAP is undefined are left out of
        the means and counted as not scored."""
        values = self.pair_pxap(cumulative)
        groups = {}
        for group in np.unique(self.pair_groups).tolist():
            scored = [v for v, g in zip(values, self.pair_groups) if g == group and v is not None]
            groups[int(group)] = {"num_pairs": int((self.pair_groups == group).sum()), "num_scored": len(scored),
                                  "mean_pxap": float(np.mean(scored)) if scored else None}
        every = [v for v in values if v is not None]
        pairs = [{"group": int(g), "pxap": v, "num_images": int(n), "num_skipped": int(s)}
                 for g, v, n, s in zip(self.pair_groups, values, self.num_images, self.num_skipped)]
        return {"accumulator": CUMULATIVE_LABEL if cumulative else FRESH_LABEL, "grid": self.grid.label,
                "groups": groups, "mean_pxap": float(np.mean(every)) if every else None, "pairs": pairs}


def _as_int64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"expected integer counts or indices, got dtype {values.dtype}")
    return values.astype(np.int64, copy=False)
