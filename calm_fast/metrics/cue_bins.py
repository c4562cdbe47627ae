"""From raw cue-map rows to integer histograms: resize, |.|, normalisation and binning (CALM.md §4).

A row is one (image, class pair): the difference of two class maps at the model's resolution. Its scores
are the difference resized bilinearly to the label maps' size (224 x 224; the difference is taken before the
resize, as in the reference), made absolute and normalised as the reference's `normalize_scoremap` does
(`NORMALIZATIONS`), in float32 as the reference's maps are. They are counted into np.histogram's bins over
a `ThresholdGrid`, split into positive and negative pixels by the row's part labels. Two paths give the
same integers: `bin_rows` (one fused numba kernel on the host: no 224 x 224 map is ever written to memory)
and `bin_rows_torch` (torch ops on the tensors' device, for GPUs). The resize is the same separable formula
in both, horizontal then vertical with float32 weights and no fused multiply-add, so both see bit-identical
scores; against OpenCV's INTER_LINEAR the scores differ only in the last bits (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from calm_fast.metrics.scoremaps import cam_thresholds
from calm_fast.modes import CueGrid

GRIDS = tuple(CueGrid)
# "none": the values are the scores. The others take |value| and turn a map with a NaN or a constant map
# into zeros; then "clip" clips to [0, 1] (the reference's CALM command), "minmax" gives (v - min) /
# max(v - min) and "max" v / max, both clipped to [0, 1].
NORMALIZATIONS = ("none", "clip", "minmax", "max")
MAX_LABELS = 63  # a label l is positive when bit l of the row's mask is set; labels >= 63 (255) never are
_LUT_SHIFT = 13  # float32 bit patterns >> 13: cells narrower than any bin, so at most one fix-up step


def log_thresholds(cam_curve_interval: float = 0.001) -> np.ndarray:
    """The reference's log-spaced grid: 10^-e for e in numpy's `arange(0, 7, 7 * interval)`, ascending.

    With interval 0.001: 1000 values 10^-6.993 (1.016e-7) ... 10^0. Built from the arange exponents as the
    reference builds them (`np.logspace` differs in the last bits).
    """
    interval = float(cam_curve_interval)
    if not 0.0 < interval <= 1.0:
        raise ValueError(f"cam_curve_interval must be in (0, 1], got {cam_curve_interval!r}")
    return 10.0 ** -np.arange(0, 7, 7 * interval)[::-1]


def _round_up_to_float32(values: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 value: for a float32 s, `s >= e` equals `s >= up(e)`."""
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


@dataclass(frozen=True, eq=False)
class ThresholdGrid:
    """Histogram bins over a threshold grid: [t_0, t_1), ..., [t_{T-1}, 1), [1, 2), [2, 3] (METRICS.md §4).

    kind "linear": numpy's arange(0, 1, interval), the grid of the WSOL metrics (no score in [0, 1] is
    dropped). kind "log": the reference's cue-localization grid (`log_thresholds`); scores below its first
    edge, exact zeros included, fall outside every bin and are dropped from positives and negatives alike,
    as the reference's `np.histogram` drops them. (Its last threshold is 1.0, so the bin [1, 1) is empty;
    it changes no PxAP.) Float32 scores are compared with the float64 edges exactly, through `edges32`.
    """

    kind: str = "log"
    cam_curve_interval: float = 0.001
    thresholds: np.ndarray = field(init=False, repr=False)
    edges: np.ndarray = field(init=False, repr=False)  # float64 [T + 3]
    edges32: np.ndarray = field(init=False, repr=False)  # float32: each edge rounded up
    lut: np.ndarray = field(init=False, repr=False)  # a lower bound of the bin of each bit-pattern cell

    def __post_init__(self):
        if self.kind not in GRIDS:
            raise ValueError(f"threshold grid {self.kind!r}: expected one of {', '.join(GRIDS)}")
        thresholds = (log_thresholds if self.kind == "log" else cam_thresholds)(self.cam_curve_interval)
        edges = np.append(thresholds, [1.0, 2.0, 3.0])
        edges32 = _round_up_to_float32(edges)
        # Cell k holds the non-negative float32 values whose bit pattern >> shift is k, up to 3.0; its entry
        # is the bin of the cell's smallest value, from which the kernels step up.
        top = int(np.float32(edges[-1]).view(np.int32)) >> _LUT_SHIFT
        starts = (np.arange(top + 1, dtype=np.int64) << _LUT_SHIFT).astype(np.int32).view(np.float32)
        lut = np.minimum(np.searchsorted(edges32, starts, side="right") - 1, len(edges) - 2)
        lut = lut.astype(np.int16 if len(edges) < 2**15 else np.int32)  # small: it should stay in cache
        for name, value in (("thresholds", thresholds), ("edges", edges), ("edges32", edges32), ("lut", lut)):
            object.__setattr__(self, name, value)

    @property
    def num_bins(self) -> int:
        return len(self.edges) - 1

    @property
    def label(self) -> str:
        if self.kind == "log":
            return (f"log-spaced, {len(self.thresholds)} thresholds {self.thresholds[0]:.4g} ... 1; scores below "
                    f"{self.thresholds[0]:.4g}, zeros included, dropped as in the reference")
        return f"linear, {len(self.thresholds)} thresholds 0 ... {self.thresholds[-1]:.4g}"

    def same_as(self, other: "ThresholdGrid") -> bool:
        return self.kind == other.kind and self.cam_curve_interval == other.cam_curve_interval


# ------------------------------------------------------------------------------------------- resize


@functools.lru_cache(maxsize=16)
def linear_resize_coefficients(source: int, target: int):
    """Bilinear resizing of one axis from `source` to `target` pixels, half-pixel centres, no antialiasing
    (OpenCV's INTER_LINEAR rule): output i = in[first[i]] * w_first[i] + in[second[i]] * w_second[i].
    Returns (first, second) int64 [target] and (w_first, w_second) float32 [target]."""
    position = ((np.arange(target) + 0.5) * (source / target) - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = (position - first.astype(np.float32)).astype(np.float32)
    outside = (first < 0) | (first >= source - 1)
    first = np.clip(first, 0, source - 1)
    fraction[outside] = 0.0
    second = np.minimum(first + 1, source - 1)
    for array in (first, second, fraction):
        array.flags.writeable = False
    return first, second, (np.float32(1.0) - fraction).astype(np.float32), fraction


def resize_rows_torch(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float32 [R, h, w] -> [R, height, width] with `linear_resize_coefficients`, horizontal then vertical,
    as separate multiply and add ops (bit-identical to the kernel of `bin_rows`); unchanged if the size fits."""
    values = values.float()
    if tuple(values.shape[1:]) == (height, width):
        return values
    device = values.device
    x0, x1, wx0, wx1 = (torch.from_numpy(np.array(a)).to(device) for a in linear_resize_coefficients(values.shape[2], width))
    y0, y1, wy0, wy1 = (torch.from_numpy(np.array(a)).to(device) for a in linear_resize_coefficients(values.shape[1], height))
    horizontal = values.index_select(2, x0) * wx0 + values.index_select(2, x1) * wx1
    return horizontal.index_select(1, y0) * wy0[:, None] + horizontal.index_select(1, y1) * wy1[:, None]


def normalize_rows_torch(scores: torch.Tensor, normalization: str) -> torch.Tensor:
    """The scores of float32 rows [R, H, W] under `normalization` (see NORMALIZATIONS), torch ops."""
    if _normalization_code(normalization) == 0:
        return scores
    scores = scores.abs()
    flat = scores.flatten(1)
    smallest, largest = flat.min(dim=1).values, flat.max(dim=1).values
    zeroed = ~(smallest < largest) | flat.isnan().any(dim=1)
    if normalization == "minmax":
        scores = (scores - smallest.view(-1, 1, 1)) / (largest - smallest).view(-1, 1, 1)
    elif normalization == "max":
        scores = scores / largest.view(-1, 1, 1)
    return torch.where(zeroed.view(-1, 1, 1), 0.0, scores.clamp(max=1.0))


# ------------------------------------------------------------------------------------------- binning


@numba.njit(cache=True, nogil=True, parallel=True)
def _row_histograms(values, labels, row_image, row_bits, resize, y0, y1, wy0, wy1, x0, x1, wx0, wx1, mode,
                    lut, shift, edges, out):
    """out[r, positive, bin] += 1 for every pixel of row r whose score falls into a bin (see `bin_rows`)."""
    num_bins = edges.size - 1
    low, high = edges[0], edges[num_bins]
    height, width = labels.shape[1], labels.shape[2]
    for r in numba.prange(values.shape[0]):
        # Pass 1: the row's values at the labels' size (|value| unless mode is "none") and their range.
        scores = np.empty((height, width), np.float32)
        if resize:
            horizontal = np.empty((values.shape[1], width), np.float32)
            for sy in range(values.shape[1]):
                for x in range(width):
                    horizontal[sy, x] = values[r, sy, x0[x]] * wx0[x] + values[r, sy, x1[x]] * wx1[x]
        smallest = largest = np.float32(0.0)
        has_nan = False
        for y in range(height):
            for x in range(width):
                if resize:
                    v = horizontal[y0[y], x] * wy0[y] + horizontal[y1[y], x] * wy1[y]
                else:
                    v = values[r, y, x]
                if mode != 0:
                    v = np.abs(v)
                    has_nan |= v != v
                    if y == 0 and x == 0:
                        smallest = largest = v
                    smallest = min(smallest, v)
                    largest = max(largest, v)
                scores[y, x] = v
        # The reference zeroes maps with a NaN, and constant ones.
        zeroed = mode != 0 and (has_nan or not smallest < largest)
        span = largest - smallest
        # Pass 2: normalise in place. Pass 3: count, reading the scores' bit patterns for the lookup table.
        if mode != 0:
            for y in range(height):
                for x in range(width):
                    s = scores[y, x]
                    if zeroed:
                        s = np.float32(0.0)
                    elif mode == 2:
                        s = (s - smallest) / span
                    elif mode == 3:
                        s = s / largest
                    scores[y, x] = min(s, np.float32(1.0))
        score_bits = scores.view(np.int32)
        image = row_image[r]
        bits = row_bits[r]
        for y in range(height):
            for x in range(width):
                s = scores[y, x]
                if not s >= low or s > high:  # NaN fails the first test
                    continue
                j = lut[max(np.int32(0), score_bits[y, x]) >> shift]  # -0.0 has a negative bit pattern
                while j < num_bins - 1 and s >= edges[j + 1]:
                    j += 1
                label = labels[image, y, x]
                positive = (bits >> label) & 1 if label < 63 else 0
                out[r, positive, j] += 1


def bin_rows(values: np.ndarray, labels: np.ndarray, row_image: np.ndarray, row_bits: np.ndarray,
             grid: ThresholdGrid, normalization: str = "none") -> np.ndarray:
    """Per-row histograms int64 [R, 2, bins] (index 1: positive pixels), with one fused numba kernel.

    values: float32 [R, h, w] raw rows, resized to the label maps' size (unless they have it) and made
    scores by `normalization`; labels: uint8 [B, H, W] label maps; row_image [R] picks each row's label
    map; row_bits [R]: bit l set = label l is positive for that row (labels >= 63, e.g. 255, never are).
    """
    values = np.ascontiguousarray(values, np.float32)
    labels = np.ascontiguousarray(labels, np.uint8)
    _check_rows(values.shape, labels.shape, row_image, row_bits)
    height, width = labels.shape[1:]
    resize = values.shape[1:] != labels.shape[1:]
    if resize and values.shape[0]:
        rows, columns = linear_resize_coefficients(values.shape[1], height), linear_resize_coefficients(values.shape[2], width)
    else:  # unused by the kernel; typed placeholders
        rows = columns = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros(1, np.float32))
    out = np.zeros((values.shape[0], 2, grid.num_bins), np.int32)  # a row has at most H * W pixels
    _row_histograms(values, labels, np.asarray(row_image, np.int64), np.asarray(row_bits, np.int64), resize,
                    *rows, *columns, _normalization_code(normalization), grid.lut, _LUT_SHIFT, grid.edges32, out)
    return out.astype(np.int64)


def bin_rows_torch(values: torch.Tensor, labels: torch.Tensor, row_image: torch.Tensor, row_bits: torch.Tensor,
                   grid: ThresholdGrid, normalization: str = "none") -> torch.Tensor:
    """`bin_rows` with torch ops on the tensors' device (for GPUs): the same integers, int64 [R, 2, bins]."""
    _check_rows(tuple(values.shape), tuple(labels.shape), row_image, row_bits)
    device = values.device
    scores = normalize_rows_torch(resize_rows_torch(values, *labels.shape[1:]), normalization)
    edges = torch.from_numpy(grid.edges32).to(device)
    num_bins, rows = grid.num_bins, scores.shape[0]
    bins = torch.bucketize(scores, edges, right=True) - 1
    bins = torch.where(scores == edges[-1], num_bins - 1, bins)  # the last bin is closed
    valid = (scores >= edges[0]) & (scores <= edges[-1])
    label = labels.to(device).long().index_select(0, row_image.to(device).long())
    bits = row_bits.to(device).long().view(-1, 1, 1)
    positive = torch.where(label < MAX_LABELS, (bits >> label.clamp(max=MAX_LABELS - 1)) & 1, 0)
    row = torch.arange(rows, device=device).view(-1, 1, 1)
    key = ((row * 2 + positive) * num_bins + bins)[valid]
    return torch.bincount(key, minlength=rows * 2 * num_bins).view(rows, 2, num_bins)


def _normalization_code(normalization: str) -> int:
    """The kernel's index of a normalisation; a clear error for an unknown one."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r}: expected one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS.index(normalization)


def _check_rows(value_shape, label_shape, row_image, row_bits) -> None:
    if len(value_shape) != 3 or len(label_shape) != 3:
        raise ValueError(f"values must be [R, h, w] and label maps [B, H, W], got {tuple(value_shape)} and "
                         f"{tuple(label_shape)}")
    if len(row_image) != value_shape[0] or len(row_bits) != value_shape[0]:
        raise ValueError(f"{value_shape[0]} rows but {len(row_image)} row images and {len(row_bits)} row masks")
    if len(row_image) and (int(row_image.min()) < 0 or int(row_image.max()) >= label_shape[0]):
        raise IndexError(f"row_image must index the {label_shape[0]} label maps")
