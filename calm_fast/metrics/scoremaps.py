"""Score maps as the reference evaluator sees them: resize, min-max normalisation, threshold grid, uint8.

See METRICS.md §1-§2. Every function here mirrors one step of the public evaluator, float for float.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from calm_fast.errors import NonFiniteMapError

SCOREMAP_SIZE = 224


def cam_thresholds(cam_curve_interval: float) -> np.ndarray:
    """The threshold grid τ: numpy's `arange(0, 1, interval)` floats (not k * interval), 1 excluded."""
    interval = float(cam_curve_interval)
    if not 0.0 < interval <= 1.0:
        raise ValueError(f"cam_curve_interval must be in (0, 1], got {cam_curve_interval!r}")
    return np.arange(0, 1, interval)


def normalize_scoremaps(cams: Sequence | np.ndarray, size: int = SCOREMAP_SIZE,
                        names: Sequence[str] | None = None) -> np.ndarray:
    """Resize each 2-D map to size x size (OpenCV bicubic, on float64) and min-max it to [0, 1].

    A map whose resized values are all equal becomes all zeros. Bicubic resizing of some constants leaves
    ~1e-15 ripples that min-max then stretches to [0, 1]; that is the reference's behaviour and is kept.
    A map with a NaN or ±inf is a ValueError naming it: the reference turns it into zeros (±inf through
    the NaN the resize makes of it), which gives a broken model numbers. ``names`` name the maps in errors
    (default ``cams[i]``). Returns float64 [N, size, size].
    """
    out = np.zeros((len(cams), size, size), np.float64)
    for i, cam in enumerate(cams):
        cam = np.asarray(cam, dtype=np.float64)
        if cam.ndim != 2 or cam.size == 0:
            raise ValueError(f"cams[{i}] must be a non-empty 2-D map, got shape {cam.shape}")
        if not np.isfinite(cam).all():
            name = names[i] if names is not None else f"cams[{i}]"
            raise NonFiniteMapError(f"{name} is not finite ({int(np.isnan(cam).sum())} NaN, "
                             f"{int(np.isinf(cam).sum())} ±inf values): the model's maps are broken")
        resized = cv2.resize(cam, (size, size), interpolation=cv2.INTER_CUBIC)
        if resized.min() == resized.max():
            continue
        resized -= resized.min()
        resized /= resized.max()
        out[i] = resized
    return out


def check_scoremaps(scoremaps: Sequence | np.ndarray) -> np.ndarray:
    """Validate score maps as the evaluator does and return them as one float64 [N, H, W] array.

    Each map must be 2-D, real, finite and inside [0, 1]; all maps must share one shape.
    """
    try:
        maps = np.asarray(scoremaps)
    except ValueError as error:  # maps of different shapes
        raise ValueError(f"scoremaps must all have the same shape [H, W]: {error}") from None
    if maps.ndim == 2:
        raise ValueError(f"scoremaps must be a batch of 2-D maps [N, H, W]; got one map of shape {maps.shape}")
    if maps.ndim != 3:
        raise ValueError(f"scoremaps must have shape [N, H, W] (all maps the same size), got {maps.shape}")
    if not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise TypeError(f"scoremaps must be real numbers, got dtype {maps.dtype}")
    maps = maps.astype(np.float64, copy=False)
    if maps.size == 0:
        return maps
    not_finite = ~np.isfinite(maps).all(axis=(1, 2))
    if not_finite.any():
        raise NonFiniteMapError(f"scoremaps[{int(np.argmax(not_finite))}] contains NaN or ±inf")
    low, high = maps.min(axis=(1, 2)), maps.max(axis=(1, 2))
    outside = (low < 0.0) | (high > 1.0)
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(f"scoremaps[{i}] has values outside [0, 1] (min {low[i]}, max {high[i]}); normalise it first")
    return maps


def check_iou_thresholds(iou_thresholds) -> tuple[int, ...]:
    """IoU thresholds δ as a tuple of ints: integer percents in (0, 100), at least one. A fraction such as
    0.5 would otherwise be truncated to 0 (every box correct); 0 and 100 are refused as degenerate."""
    values = tuple(iou_thresholds)
    integral = all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values)
    if not values or not integral or not all(0 < v < 100 for v in values):
        raise ValueError(f"iou_thresholds must be integer percents in (0, 100) such as (30, 50, 70), got {values}")
    return tuple(int(v) for v in values)


def quantize_scoremaps(scoremaps: np.ndarray) -> np.ndarray:
    """`(s * 255).astype(uint8)`: truncation, so every score below 1/255 becomes 0."""
    return (scoremaps * 255).astype(np.uint8)


def integer_thresholds(quantized: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """θ[i, k] = int(τ_k * max(u_i)): the cv2.threshold level of map i at τ_k; foreground is u > θ."""
    peaks = quantized.reshape(len(quantized), -1).max(axis=1).astype(np.float64)
    return (thresholds[None, :] * peaks[:, None]).astype(np.int64)
