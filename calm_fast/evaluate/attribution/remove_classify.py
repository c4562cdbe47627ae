"""Remove-and-classify (CALM.md §4), batched on the device: erase the top-k pixels of a map, or k random ones,
and count how often the model still classifies the image correctly.

For each erased fraction k (default 10, 30, 50, 70, 90 %) and each map, n_k = int(k·H·W) pixels of the
input (H×W, e.g. 224²) are set to zero, the mean colour after ImageNet normalisation, in all channels:
- top-k: the n_k pixels where the GT-class map, resized bilinearly to H×W (`F.interpolate`,
  align_corners=False, the same sampling as OpenCV's INTER_LINEAR when enlarging) and not normalised, is
  highest. Ties (CALM's zero-prior cells give plateaus) are broken by a random order keyed on (seed,
  image index): the map is sorted once per image on one int64 key, its value's order in the high 32 bits
  and the tie-break hash in the low 32 bits, so one argsort ranks every pixel and every k reads its mask
  off the ranks.
- random: n_k pixels drawn afresh per image and per k (not nested across k), keyed on (seed, image index,
  k): the n_k pixels with the smallest keyed hash, found with one kthvalue per k. The random erasure does
  not depend on the map, so it is run once per image and shared by every map of the model.

One batch of B images with M maps makes B·(1 + F + M·F) classifier inputs (clean, random, top; the clean
pass is skipped when the caller already has the clean predictions), built row by row from the masks and
classified in chunks of `max_batch`. The counts go into `calm_fast.metrics.remove_classify.
RemoveClassifyCounts` (integers, exact across ranks); the masks depend only on (seed, image index, map),
so the counts do not depend on batch size, chunk size or rank count (given the same predictions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from calm_fast.errors import NonFiniteMapError
from calm_fast.evaluate.attribution.keyed_random import RANDOM_ERASURE, TIE_BREAK, key64, keyed_hash31
from calm_fast.evaluate.attribution.model_fns import ClassifyFn, autocast_context
from calm_fast.metrics.remove_classify import RemoveClassifyCounts, check_fractions, erased_pixel_count

# The keyed streams name a fraction by its parts per million, so 0.1 and 0.1000000001 are one stream.
_PPM = 1_000_000


def resize_maps(maps, size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Maps [B, h, w] (numpy or torch, any float dtype) -> fp32 [B, H, W] on `device`, resized bilinearly."""
    maps = torch.as_tensor(maps)
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, h, w], got shape {tuple(maps.shape)}")
    maps = maps.to(device=device if device is not None else maps.device, dtype=torch.float32)
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _order_preserving_int(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 with the same order (total for non-NaN values; -0.0 is made +0.0 first)."""
    bits = (values + 0.0).contiguous().view(torch.int32).to(torch.int64)
    # Negative floats order backwards by their bits: flip all but the sign bit.
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def pixel_ranks(maps: torch.Tensor, indices: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Rank of every pixel of each map, 0 = highest: int64 [B, H·W]; ties in a random order keyed on
    (seed, image index). `maps` is fp32 [B, H, W] at the input size."""
    batch = maps.shape[0]
    flat = maps.reshape(batch, -1).float()
    if not bool(torch.isfinite(flat).all()):  # as every metric: a broken model's maps get no numbers
        raise NonFiniteMapError("maps: NaN or ±inf scores (the model's maps are broken); they are not ranked")
    num_pixels = flat.shape[1]
    ties = keyed_hash31([key64(TIE_BREAK, seed, index) for index in indices], num_pixels, flat.device)
    # Descending value first (~v = -v - 1 reverses the order), then ascending tie hash (< 2^31 <= 2^32):
    # |~v| <= 2^31, so ~v · 2^32 + hash fits int64, and the keys are distinct.
    sort_key = ~_order_preserving_int(flat) * (1 << 32) + ties
    order = sort_key.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(num_pixels, device=flat.device).expand(batch, num_pixels))
    return ranks


def random_erasures(indices: Sequence[int], fractions: Sequence[float], num_pixels: int, seed: int = 0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """bool [B, F, num_pixels], True = erased: for image i and fraction k the int(k·num_pixels) pixels
    with the smallest hash keyed on (seed, i, k); exactly that many, independent across k."""
    fractions = check_fractions(fractions)
    erased = torch.zeros(len(indices), len(fractions), num_pixels, dtype=torch.bool, device=device)
    for column, fraction in enumerate(fractions):
        count = erased_pixel_count(fraction, num_pixels)
        if count == 0:
            continue
        keys = [key64(RANDOM_ERASURE, seed, index, round(fraction * _PPM)) for index in indices]
        hashed = keyed_hash31(keys, num_pixels, device)
        threshold = hashed.kthvalue(count, dim=1).values
        erased[:, column] = hashed <= threshold[:, None]
    return erased


def top_erasures(ranks: torch.Tensor, fractions: Sequence[float]) -> torch.Tensor:
    """bool [B, F, P], True = erased: the int(k·P) pixels of rank 0 .. n_k - 1 (from `pixel_ranks`)."""
    counts = torch.tensor([erased_pixel_count(f, ranks.shape[1]) for f in check_fractions(fractions)],
                          device=ranks.device)
    return ranks[:, None, :] < counts[None, :, None]


class _StageTimer:
    """Adds each stage's wall time (device synchronised) to `timings[stage]` and this process's CPU time to
    `timings[stage + "_cpu"]` (the cost on a shared CPU, where wall time also counts other work); nothing
    when timings is None."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.device = timings, device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.timings is None:
            yield
            return
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self._sync()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - wall
        self.timings[f"{stage}_cpu"] = self.timings.get(f"{stage}_cpu", 0.0) + time.process_time() - cpu


def remove_and_classify(classify: ClassifyFn, images: torch.Tensor, labels, indices, maps: Mapping[str, object],
                        counts: RemoveClassifyCounts, seed: int = 0, max_batch: int = 256,
                        clean_predictions=None, autocast_dtype: torch.dtype | None = None,
                        timings: dict[str, float] | None = None) -> None:
    """Add one batch to `counts`.

    images: normalised [B, 3, H, W] on the model's device; labels [B]; indices [B]: the images' indices in
    the split (the keys of every random draw); maps: name -> GT-class maps [B, h, w] for every name of
    `counts.map_names` (any resolution; resized to H×W). clean_predictions [B]: the model's clean
    predictions if already known (saves B forward passes); else the clean images are classified here.
    max_batch: classifier inputs per call. timings: if a dict, the wall seconds of the stages "rank" (resize,
    ranks, random masks), "mask" (building the erased inputs) and "forward" (classifying) are added to it,
    and this process's CPU seconds as "rank_cpu", "mask_cpu", "forward_cpu".
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    missing = [name for name in counts.map_names if name not in maps]
    if missing:
        raise ValueError(f"maps: no map for {missing}; expected {list(counts.map_names)}")
    device = images.device
    batch, _, height, width = images.shape
    num_pixels = height * width
    labels = torch.as_tensor(labels, device=device).long()
    indices = [int(i) for i in torch.as_tensor(indices).tolist()]
    if labels.shape != (batch,) or len(indices) != batch:
        raise ValueError(f"expected {batch} labels and indices, got {tuple(labels.shape)} and {len(indices)}")
    timer = _StageTimer(timings, device)
    fractions = counts.fractions

    with timer("rank"):
        parts = [random_erasures(indices, fractions, num_pixels, seed, device)]
        for name in counts.map_names:
            resized = resize_maps(maps[name], (height, width), device)
            if resized.shape[0] != batch:
                raise ValueError(f"maps[{name!r}] holds {resized.shape[0]} maps for {batch} images")
            parts.append(top_erasures(pixel_ranks(resized, indices, seed), fractions))
        if clean_predictions is None:
            parts.insert(0, torch.zeros(batch, 1, num_pixels, dtype=torch.bool, device=device))
        erased = torch.cat(parts, dim=1)  # [B, V, P]: (clean), random F, then F per map
    variants = erased.shape[1]
    erased = erased.reshape(batch * variants, 1, height, width)

    correct = torch.zeros(variants, dtype=torch.int64, device=device)
    for start in range(0, batch * variants, max_batch):
        rows = torch.arange(start, min(start + max_batch, batch * variants), device=device)
        image_of_row = rows // variants
        with timer("mask"):
            inputs = images[image_of_row].masked_fill(erased[rows], 0)
        with timer("forward"):
            with autocast_context(device, autocast_dtype):
                predicted = classify(inputs).argmax(dim=1)
            hits = predicted == labels[image_of_row]
            correct.index_add_(0, rows[hits] % variants, torch.ones_like(rows[hits]))

    correct = correct.cpu().numpy()
    if clean_predictions is None:
        clean, correct = int(correct[0]), correct[1:]
    else:
        clean_predictions = torch.as_tensor(clean_predictions).to(device).long()
        clean = int((clean_predictions == labels).sum())
    num_fractions = len(fractions)
    counts.add(batch, clean, correct[:num_fractions],
               np.asarray(correct[num_fractions:]).reshape(len(counts.map_names), num_fractions))
