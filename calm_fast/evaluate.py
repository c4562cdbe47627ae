"""Evaluate a trained model (or a class-agnostic baseline map) on a WSOL split: MaxBoxAcc, MaxBoxAccV2, PxAP.

What is measured (METRICS.md). For every image the map of its ground-truth class (GT-known) is taken at
the model's resolution, turned into float64, resized to 224×224 with OpenCV's bicubic filter and min-max
normalised (`normalize_scoremaps`), exactly as the reference evaluator's pipeline does. Box datasets get
MaxBoxAcc (v1: IoU 0.5, largest contour only), MaxBoxAccV2 (every contour, mean over IoU 0.3/0.5/0.7),
top-1 localization (box correct AND predicted class correct; the predicted class is the argmax of
`calm_fast.head.class_log_probs`) and classification accuracy; mask datasets get PxAP. The synthetic
datasets have both boxes and masks and get both.

Distributed. The same code runs as one process, under `deepspeed` or under `torchrun`. Each rank takes a
shard of the split (rank r: samples r, r+W, ...; every sample exactly once, which is checked), turns its
maps into the metrics' exact integer state (counts per IoU × score threshold, pixel histograms) and the
states are summed with one int64 all_reduce, so W ranks give exactly the one-process numbers for the same
maps. (The maps themselves are floats from the model: a different CPU thread count, or on GPU a different
kernel choice, can change their last bits and so move a pixel across a threshold.)

Outputs, under `<run_dir>/eval/<split>/` (or --out), written by rank 0, each file atomically:
  results.json            every number, curves included (NaN written as null)
  metric_state.npz        the summed integer metric state (re-mergeable; two runs are equal iff these are)
  boxacc_<map>.png        BoxAcc against the score-map threshold (box datasets)
  pr_<map>.png            the pixel precision-recall curve (mask datasets)
  overlays_<map>.png      the first few images with GT box, predicted box and the map
  per_class_<map>.csv/png the per-class breakdown
  maps/rank<r>.npz        only with --save-maps: this rank's raw maps (map_<name>: float32 [n, h, w] at
                          the model's resolution) with their indices, labels and predicted classes

Map sources. `evaluate_maps(map_fn, split, loader, ...)` scores anything that turns a batch into maps:
a model (`ModelMaps`), or a class-agnostic baseline (`BaselineMaps`: a centred Gaussian, the smoothed
image-gradient energy), through the same metric code.

Examples (config overrides go before the list options --split/--map-kind/--baseline):
  calm-fast eval --run runs/synthetic                       model.pt of the run, eval.split, eval.map_kind
  calm-fast eval --run runs/synthetic eval.cam_curve_interval=0.001 --split val test --map-kind all
  calm-fast eval -c configs/synthetic.toml --baseline centre-gaussian image-energy
  torchrun --standalone --nproc_per_node 8 -m calm_fast.cli eval --run runs/x      (or the deepspeed
      launcher with --module calm_fast.cli eval ...): 8 ranks, the same numbers as one process
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from calm_fast.config import Config, ConfigError, effective_map_kind, load_config, with_overrides
from calm_fast.distributed import all_reduce_sum, share_cpu_threads
from calm_fast.head import MAP_KINDS

BASELINES = ("centre-gaussian", "image-energy")
RESULTS_FORMAT = "calm-fast-eval/1"
V1_IOU = 50  # MaxBoxAcc (v1) is IoU 0.5 with the largest contour only


# ----------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EvalSettings:
    """What to measure and what to keep. `from_config` reads the `[eval]` section."""

    cam_curve_interval: float = 0.01
    iou_thresholds: tuple[int, ...] = (30, 50, 70)
    multi_contour: bool = True  # MaxBoxAccV2's box rule; False scores every δ with the largest contour only
    per_class: bool = True  # keep one metric state per class (the per-class breakdown)
    overlay_count: int = 0  # keep the maps of the split's first n images for the overlay grid
    save_maps: bool = False  # keep every raw map of this rank (for maps/rank<r>.npz)

    def __post_init__(self):
        if not 0.0 < self.cam_curve_interval < 1.0:
            raise ValueError(f"cam_curve_interval must lie in (0, 1), got {self.cam_curve_interval}")
        if not self.iou_thresholds or any(not 0 < t <= 100 for t in self.iou_thresholds):
            raise ValueError(f"iou_thresholds must be percentages in (0, 100], got {self.iou_thresholds}")
        if self.overlay_count < 0:
            raise ValueError(f"overlay_count must be >= 0, got {self.overlay_count}")

    @classmethod
    def from_config(cls, cfg: Config, **changes) -> "EvalSettings":
        return cls(cam_curve_interval=cfg.eval.cam_curve_interval, iou_thresholds=tuple(cfg.eval.iou_thresholds),
                   multi_contour=cfg.eval.multi_contour, **changes)


# -------------------------------------------------------------------------------------- map sources


@dataclass
class MapBatch:
    """What a map source returns for one batch.

    maps: map name -> [B, h, w] scores (any float dtype, numpy or torch, any resolution: they are
    resized to 224×224 and normalised by the metric pipeline). pred_classes: [B] predicted classes, or
    None for a source that does not classify (then top-1 localization and accuracy are not reported).
    """

    maps: dict[str, np.ndarray | torch.Tensor]
    pred_classes: np.ndarray | torch.Tensor | None = None


# map_fn(images [B,3,S,S] as the loader gives them, labels [B], indices [B]) -> MapBatch
MapFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], MapBatch]


class ModelMaps:
    """A WSOL model as a map source: the GT-class maps of the chosen kinds and the predicted classes.

    The model runs in eval mode under no_grad on `device`; the head math (`class_log_probs`, fused
    kernels on CUDA) decides the predicted class, `attribution_map` gives each map kind.
    """

    def __init__(self, model: torch.nn.Module, method: str, kinds: tuple[str, ...], prior: str = "relu",
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        from calm_fast.models.wsol import check_method

        check_method(method)
        check_map_kinds(kinds, method)
        self.model, self.method, self.kinds, self.prior = model, method, tuple(kinds), prior
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MapBatch:
        from calm_fast.head import attribution_map, class_log_probs

        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        class_logits, location_scores = self.model(images)
        predicted = class_log_probs(class_logits, location_scores, self.method, self.prior).argmax(dim=1)
        maps = {kind: attribution_map(class_logits, location_scores, labels, kind, self.prior).cpu()
                for kind in self.kinds}
        return MapBatch(maps=maps, pred_classes=predicted.cpu())


def check_map_kinds(kinds, method: str) -> None:
    """Every kind must be a CALM map kind; CAM has no location head, so only its class map."""
    if not kinds:
        raise ValueError("no map kind to evaluate")
    for kind in kinds:
        if kind not in MAP_KINDS:
            raise ValueError(f"map kind {kind!r}: expected one of {', '.join(MAP_KINDS)}")
        if method == "cam" and kind != "class":
            raise ValueError(f"map kind {kind!r} needs a CALM model (location head); CAM has only the 'class' map")


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo the loaders' ImageNet normalisation: float [B,3,S,S] -> uint8 [B,S,S,3] (RGB)."""
    from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class BaselineMaps:
    """Class-agnostic baselines (`calm_fast.baselines`) as a map source, at the loader's resolution.

    "centre-gaussian": the same centred Gaussian for every image; "image-energy": the smoothed gradient
    energy of the image as the model would see it (resized to input_size², normalisation undone).
    """

    def __init__(self, names: tuple[str, ...], energy_sigma_frac: float | None = None):
        for name in names:
            if name not in BASELINES:
                raise ValueError(f"baseline {name!r}: expected one of {', '.join(BASELINES)}")
        if not names:
            raise ValueError("no baseline to evaluate")
        self.names = tuple(names)
        self.energy_sigma_frac = energy_sigma_frac

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MapBatch:
        from calm_fast import baselines

        batch, _, height, width = images.shape
        maps: dict[str, np.ndarray] = {}
        if "centre-gaussian" in self.names:
            maps["centre-gaussian"] = np.broadcast_to(baselines.centre_gaussian_map(height, width),
                                                      (batch, height, width))
        if "image-energy" in self.names:
            pixels = images_to_uint8(images)
            kwargs = {} if self.energy_sigma_frac is None else {"sigma_frac": self.energy_sigma_frac}
            maps["image-energy"] = np.stack([baselines.image_energy_map(image, **kwargs) for image in pixels])
        return MapBatch(maps=maps, pred_classes=None)


# ------------------------------------------------------------------------------------- metric state


def _as_numpy(array) -> np.ndarray:
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
        from calm_fast.metrics import BoxAccuracy, PixelAP

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


# ----------------------------------------------------------------------------------- distributed sum


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


def _gather_to_all(obj) -> list:
    if _world_size() == 1:
        return [obj]
    gathered: list = [None] * _world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------- the evaluation


@dataclass
class Evaluation:
    """What `evaluate_maps` returns (identical on every rank).

    results: map name -> the metrics of `MapMetrics.results`; state: map name -> summed integer state;
    overlays: index -> (map name -> raw map, predicted class or None), the first images of the split;
    saved_maps: this rank's raw maps (only with settings.save_maps).
    """

    num_images: int
    results: dict[str, dict[str, Any]]
    state: dict[str, dict[str, np.ndarray]]
    overlays: dict[int, tuple[dict[str, np.ndarray], int | None]] = field(default_factory=dict)
    saved_maps: dict[str, np.ndarray] | None = None
    seconds: float = 0.0


def ground_truth(split, indices: np.ndarray, need_boxes: bool, need_masks: bool):
    """(boxes in the 224 frame, one [k,4] array per image | None; masks uint8 [B,224,224] | None)."""
    from calm_fast.metrics import load_gt_mask, rescale_boxes

    boxes = masks = None
    if need_boxes:
        sizes = split.image_sizes
        boxes = [np.asarray(rescale_boxes(split.boxes[i], tuple(int(v) for v in sizes[i]))) for i in indices]
    if need_masks:
        masks = np.stack([load_gt_mask(split.masks[i].paths, split.masks[i].ignore_path) for i in indices])
    return boxes, masks


def evaluate_maps(map_fn: MapFn, split, loader, settings: EvalSettings = EvalSettings(),
                  progress: bool = False) -> Evaluation:
    """Score the maps of `map_fn` on `split`, with this rank's shard of the samples coming from `loader`.

    `loader` yields (images, labels, indices); indices address `split`. Collective when a process group
    is initialised: every rank calls it with its own shard and all get the same summed result. Raises if a sample is missing or evaluated
    twice across ranks, or if a loader's label disagrees with the split.
    """
    started = time.perf_counter()
    shard = _evaluate_shard(map_fn, split, loader, settings, progress)
    return _combine_shards(shard, split, settings, started)


@dataclass
class _Shard:
    """One rank's part of an evaluation, before the ranks are combined."""

    metrics: dict[str, MapMetrics] = field(default_factory=dict)
    seen: np.ndarray | None = None  # int64 [N]: how often each sample was evaluated here
    overlays: dict[int, tuple[dict[str, np.ndarray], int | None]] = field(default_factory=dict)
    saved: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _evaluate_shard(map_fn: MapFn, split, loader, settings: EvalSettings, progress: bool) -> _Shard:
    from calm_fast.metrics import normalize_scoremaps

    shard = _Shard(seen=np.zeros(len(split), np.int64))
    for images, labels, indices in _with_progress(loader, progress, "eval"):
        labels_np = _as_numpy(labels).astype(np.int64)
        indices_np = _as_numpy(indices).astype(np.int64)
        _check_batch(split, labels_np, indices_np)
        np.add.at(shard.seen, indices_np, 1)
        batch = map_fn(images, labels, indices)
        raw_maps = {name: _as_numpy(raw) for name, raw in batch.maps.items()}
        pred = None if batch.pred_classes is None else _as_numpy(batch.pred_classes).astype(np.int64)
        if not shard.metrics:
            shard.metrics = {name: MapMetrics(split, settings, classifies=pred is not None) for name in raw_maps}
        # Ground truth is read once per batch and shared by every map.
        boxes, masks = ground_truth(split, indices_np, split.boxes is not None, split.masks is not None)
        for name, raw in raw_maps.items():
            shard.metrics[name].update(normalize_scoremaps(raw), labels_np, pred, boxes, masks)
        for row, index in enumerate(indices_np.tolist()):
            if index < settings.overlay_count:
                shard.overlays[index] = ({name: raw[row].astype(np.float32) for name, raw in raw_maps.items()},
                                         None if pred is None else int(pred[row]))
        if settings.save_maps:
            kept = {f"map_{name}": raw.astype(np.float32) for name, raw in raw_maps.items()}
            kept.update(indices=indices_np, labels=labels_np)
            if pred is not None:
                kept["pred_classes"] = pred
            for key, value in kept.items():
                shard.saved.setdefault(key, []).append(value)
    return shard


def _combine_shards(shard: _Shard, split, settings: EvalSettings, started: float) -> Evaluation:
    """Sum the ranks' states (one all_reduce) and compute the numbers, identically on every rank."""
    # A rank whose shard was empty learns the map names and whether the source classifies from the others.
    described = None
    if shard.metrics:
        described = (list(shard.metrics), next(iter(shard.metrics.values())).classifies)
    described = next((d for d in _gather_to_all(described) if d is not None), None)
    if described is None:
        raise ValueError(f"{split.metadata_dir}: the loader gave no sample on any rank")
    names, classifies = described
    metrics = {name: shard.metrics.get(name) or MapMetrics(split, settings, classifies) for name in names}

    summed_seen, *summed = all_reduce_states([{"seen": shard.seen}] + [metrics[name].state() for name in names])
    _check_coverage(split, summed_seen["seen"])
    results, state = {}, {}
    for name, total in zip(names, summed):
        metrics[name].load_state(total)
        results[name] = metrics[name].results()
        state[name] = total
    overlays = {}
    for part in _gather_to_all(shard.overlays):
        overlays.update(part)
    saved_maps = {key: np.concatenate(value) for key, value in shard.saved.items()} if settings.save_maps else None
    return Evaluation(num_images=len(split), results=results, state=state, overlays=overlays,
                      saved_maps=saved_maps, seconds=time.perf_counter() - started)


def _check_batch(split, labels: np.ndarray, indices: np.ndarray) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= len(split)):
        raise IndexError(f"{split.metadata_dir}: the loader gave sample index {int(indices.max())} outside "
                         f"[0, {len(split)}); was it built for another split?")
    wrong = np.flatnonzero(split.labels[indices] != labels)
    if wrong.size:
        i = int(indices[wrong[0]])
        raise ValueError(f"{split.metadata_dir}: the loader's label {int(labels[wrong[0]])} for sample {i} "
                         f"({split.image_ids[i]!r}) differs from class_labels.txt ({int(split.labels[i])}); "
                         "is the loader's data (a .beton?) out of date?")


def _check_coverage(split, seen: np.ndarray) -> None:
    """Every sample exactly once across ranks: a missing or duplicated sample changes the numbers."""
    bad = np.flatnonzero(seen != 1)
    if bad.size:
        i = int(bad[0])
        raise RuntimeError(f"{split.metadata_dir}: sample {i} ({split.image_ids[i]!r}) was evaluated {int(seen[i])} "
                           f"times across ranks ({bad.size} sample(s) not exactly once); the evaluation loader "
                           "must shard every sample exactly once, without padding")


def _with_progress(iterable, enabled: bool, label: str):
    if not enabled:
        yield from iterable
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(iterable) if hasattr(iterable, "__len__") else None
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        for item in iterable:
            yield item
            bar.advance(task)


# ----------------------------------------------------------------------------------- models and data


def build_eval_loader(cfg: Config, split, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu"):
    """The evaluation loader of `split` for this rank: images resized straight to input_size², ImageNet
    mean/std; rank r takes samples r, r+W, ... (each exactly once, no padding); yields (images, labels,
    indices) with cfg.eval.batch_size images per batch.

    data.loader picks FFCV or the plain PyTorch loader: "auto" takes FFCV when the split's .beton
    (`calm-fast convert`) exists and matches the metadata, "ffcv" insists, "torch" never uses it.
    """
    from calm_fast.data import ffcv
    from calm_fast.data.torch_loader import build_torch_loader

    data = cfg.data
    kind, beton = loader_kind(cfg, split)
    if kind == "ffcv":
        return ffcv.build_ffcv_loader(beton, train=False, input_size=data.input_size,
                                      batch_size=cfg.eval.batch_size, num_workers=max(1, data.workers),
                                      rank=rank, world_size=world_size, seed=cfg.train.seed, device=device)
    return build_torch_loader(split, train=False, input_size=data.input_size, resize_size=data.resize_size,
                              batch_size=cfg.eval.batch_size, num_workers=data.workers, rank=rank,
                              world_size=world_size, seed=cfg.train.seed, drop_last=False,
                              pin_memory=torch.device(device).type == "cuda")


def loader_kind(cfg: Config, split) -> tuple[str, Path]:
    """("ffcv" or "torch", the split's .beton path) for data.loader: "auto" takes FFCV when the split's
    .beton exists and matches its metadata, "ffcv" insists (a stale file is an error), "torch" never uses it."""
    from calm_fast.data import ffcv

    data = cfg.data
    beton = ffcv.beton_path_for(data.beton_dir or Path(data.root) / "ffcv", split.dataset, split.split)
    matches = beton.is_file() and _beton_matches(split, beton)
    if data.loader == "ffcv" and beton.is_file() and not matches:
        raise FileNotFoundError(f"{beton} does not match {split.metadata_dir} (converted from other metadata "
                                "or options): run `calm-fast convert` again")
    if data.loader == "torch" or (data.loader == "auto" and not matches):
        return "torch", beton
    return ffcv.resolve_loader_kind(data.loader, [beton]), beton


def _beton_matches(split, beton: Path) -> bool:
    """The .beton's sidecar says it was converted from this split's current metadata."""
    from calm_fast.data import ffcv

    info = ffcv.read_beton_info(beton)
    if info is None or not isinstance(info.get("options"), dict):
        return False
    try:
        options = ffcv.ConvertOptions(**info["options"])
    except TypeError:  # written by another version
        return False
    return ffcv.is_up_to_date(split, beton, options)


def read_configured_split(cfg: Config, split_name: str, num_classes: int | None = None):
    """Read `split_name` of the configured dataset as a WSOLSplit (labels bounded by `num_classes`, default
    data.num_classes, else the split's largest label + 1). The image root is the one configured for the
    split of that name (data.train_split / val_split / test_split), else DATA.md's default."""
    from calm_fast.data.metadata import default_image_root, default_metadata_root, read_split

    data = cfg.data
    metadata_root = data.metadata_root or default_metadata_root(data.root)
    image_root = {data.test_split: data.test_image_root, data.val_split: data.val_image_root,
                  data.train_split: data.train_image_root}.get(split_name)
    image_root = image_root or default_image_root(data.root, data.dataset, split_name)
    return read_split(metadata_root, data.dataset, split_name, image_root, mask_root=data.mask_root,
                      num_classes=num_classes or data.num_classes)


def evaluate_model(model: torch.nn.Module, split, cfg: Config, world=None, dtype: torch.dtype | None = None,
                   loader=None, map_kinds: tuple[str, ...] | None = None,
                   settings: EvalSettings | None = None, progress: bool = False) -> dict[str, Any]:
    """Localization metrics of `model` on `split`: the function behind `calm-fast eval` and the periodic
    validation of training. Collective when a process group is initialised.

    Returns the headline numbers of the first map kind (default: the config's) as top-level scalars
    (`cls_top1_acc`, `max_box_acc`, `max_box_acc_v2`, `top1_loc` (v1: IoU 0.5, one box), `pxap`;
    absent when they do not apply), plus "map_kind", "num_images" and "maps" (every kind's full
    results) and "evaluation" (the `Evaluation`). The model's train/eval mode is restored afterwards.
    """
    device = world.device if world is not None else next(model.parameters()).device
    map_kinds = tuple(map_kinds or (effective_map_kind(cfg),))
    settings = settings or EvalSettings.from_config(cfg)
    if loader is None:
        rank, size = (world.rank, world.world_size) if world is not None else (0, 1)
        loader = build_eval_loader(cfg, split, rank, size, device)
    source = ModelMaps(model, cfg.model.method, map_kinds, cfg.model.prior, device, dtype)
    was_training = model.training
    model.eval()
    try:
        evaluation = evaluate_maps(source, split, loader, settings, progress=progress)
    finally:
        model.train(was_training)
    return {**headline(evaluation.results[map_kinds[0]]), "map_kind": map_kinds[0],
            "num_images": evaluation.num_images, "maps": evaluation.results, "evaluation": evaluation}


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The few numbers people quote, from one map's results (keys absent when they do not apply)."""
    out = {}
    if results.get("cls_top1_acc") is not None:
        out["cls_top1_acc"] = results["cls_top1_acc"]
    box = results.get("box")
    if box:
        out["max_box_acc"] = box["max_box_acc"]
        out["max_box_acc_v2"] = box["max_box_acc_v2"]
        if box["v1"]["top1_loc"] is not None:
            out["top1_loc"] = box["v1"]["top1_loc"]
    mask = results.get("mask")
    if mask and mask.get("pxap") is not None:
        out["pxap"] = mask["pxap"]
    return out


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(state dict, config or None) from a checkpoint of any form calm-fast meets.

    Accepted: a run folder (its model.pt, else its newest checkpoint), a training checkpoint folder
    (`checkpoints/step_N`, consolidated from ZeRO shards), a file written by `calm-fast train --export`,
    or a plain PyTorch state dict file (optionally under "state_dict"/"model"/"module", with DDP's
    "module." prefixes).
    """
    from calm_fast import checkpoint as ckpt

    path = Path(path)
    if path.is_dir():
        if (path / ckpt.DEEPSPEED_TAG).is_dir():
            return ckpt.consolidate(path)
        if (path / "model.pt").is_file():
            return load_weights(path / "model.pt")
        newest = ckpt.latest_checkpoint(path)
        if newest is not None:
            return ckpt.consolidate(newest)
        raise FileNotFoundError(f"{path}: neither model.pt, a checkpoint folder nor {ckpt.CHECKPOINTS}/step_* here")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(payload, dict) and payload.get("format") == ckpt.EXPORT_FORMAT:
        state_dict, cfg, _ = ckpt.unpack_exported(payload, path)
        return state_dict, cfg
    for key in ("state_dict", "model", "module"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")
    return {_strip_prefix(k): v for k, v in payload.items()}, None


def _strip_prefix(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def build_model_from(cfg: Config, num_classes: int, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The configured architecture with `state_dict` loaded (strict: a mismatch names the keys)."""
    from calm_fast.models import build_model

    model = build_model(cfg.model.backbone, num_classes, cfg.model.method,
                        large_feature_map=cfg.model.large_feature_map, batch_norm=cfg.model.batch_norm)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit model.backbone={cfg.model.backbone!r} "
                         f"model.method={cfg.model.method!r} with {num_classes} classes: missing "
                         f"{missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    return model


# ----------------------------------------------------------------------------------------- reports


def write_reports(evaluation: Evaluation, split, out_dir: Path, info: dict[str, Any], settings: EvalSettings,
                  console=None) -> dict[str, Any]:
    """results.json, metric_state.npz, plots, overlays and per-class files for one split (rank 0)."""
    from calm_fast import report

    out_dir = Path(out_dir)
    results = {"format": RESULTS_FORMAT, **info, "dataset": split.dataset, "split": split.split,
               "num_images": evaluation.num_images, "num_classes": split.num_classes,
               "cam_curve_interval": settings.cam_curve_interval,
               "iou_thresholds": list(settings.iou_thresholds), "multi_contour": settings.multi_contour,
               "seconds": round(evaluation.seconds, 3), "maps": evaluation.results}
    report.write_json(out_dir / "results.json", results)
    report.save_npz(out_dir / "metric_state.npz",
                    **{f"{name}/{key}": value for name, state in evaluation.state.items()
                       for key, value in state.items()})
    for name, metrics in evaluation.results.items():
        _write_map_reports(report, out_dir, name, metrics, evaluation, split, settings)
    report.print_results(results, console=console)
    return results


def _write_map_reports(report, out_dir: Path, name: str, metrics: dict, evaluation: Evaluation, split,
                       settings: EvalSettings) -> None:
    box, mask = metrics.get("box"), metrics.get("mask")
    if box:
        curves = {f"V2 δ={iou}": curve for iou, curve in box["curves"].items()}
        curves[f"v1 δ={V1_IOU} (largest contour)"] = box["v1_curve"]
        report.plot_box_accuracy(out_dir / f"boxacc_{name}.png", box["thresholds"], curves,
                                 title=f"{split.dataset} {split.split}, {name} map")
    if mask and mask.get("pxap") is not None:
        report.plot_pr_curve(out_dir / f"pr_{name}.png", mask["precision"], mask["recall"], mask["pxap"],
                             title=f"{split.dataset} {split.split}, {name} map")
    rows = metrics.get("per_class")
    if rows:
        report.write_per_class_csv(out_dir / f"per_class_{name}.csv", rows)
        key, label = ("box_acc_v2", "BoxAccV2 at the split's best τ (%)") if box else ("pxap", "PxAP (%)")
        if any(row.get(key) is not None for row in rows):
            report.plot_per_class(out_dir / f"per_class_{name}.png", rows, key, label,
                                  title=f"{split.dataset} {split.split}, {name} map, per class")
    if evaluation.overlays:
        items = overlay_items(evaluation, split, name, metrics)
        report.plot_overlay_grid(out_dir / f"overlays_{name}.png", items,
                                 title=f"{split.dataset} {split.split}, {name} map: GT green, predicted red")


def overlay_items(evaluation: Evaluation, split, name: str, metrics: dict) -> list:
    """The overlay grid's cells: image, normalised map, GT boxes/mask and the box predicted at the best
    threshold of MaxBoxAcc (v1: the largest contour), all in the 224×224 metric frame."""
    import cv2

    from calm_fast.data.torch_loader import load_rgb
    from calm_fast.metrics import normalize_scoremaps
    from calm_fast.metrics.opencv_reference import contour_boxes
    from calm_fast.metrics.scoremaps import SCOREMAP_SIZE, integer_thresholds, quantize_scoremaps
    from calm_fast.report import OverlayItem

    box = metrics.get("box")
    items = []
    for index in sorted(evaluation.overlays):
        maps, predicted = evaluation.overlays[index]
        scoremap = normalize_scoremaps([maps[name]])[0]
        image = np.asarray(load_rgb(split.image_path(index)))
        image = cv2.resize(image, (SCOREMAP_SIZE, SCOREMAP_SIZE), interpolation=cv2.INTER_LINEAR)
        gt_boxes, gt_masks = ground_truth(split, np.array([index]), split.boxes is not None, split.masks is not None)
        pred_boxes = None
        if box:
            quantized = quantize_scoremaps(scoremap[None])
            level = integer_thresholds(quantized, np.array([box["v1"]["best_threshold"]]))[0, 0]
            pred_boxes = contour_boxes(quantized[0], int(level), multi_contour=False)
        label = int(split.labels[index])
        title = f"#{index} y={label}" + ("" if predicted is None else f" ŷ={predicted}")
        items.append(OverlayItem(image=image, scoremap=scoremap, title=title,
                                 gt_boxes=None if gt_boxes is None else gt_boxes[0], pred_boxes=pred_boxes,
                                 gt_mask=None if gt_masks is None else gt_masks[0]))
    return items


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", metavar="RUN_DIR",
                        help="a training run folder: its config.toml, its model.pt (else newest checkpoint), "
                             "and results under RUN_DIR/eval/")
    parser.add_argument("--config", "-c", metavar="TOML", help="experiment config (default: the run's or the "
                        "checkpoint's own)")
    parser.add_argument("--checkpoint", metavar="PATH", help="model.pt from training, a checkpoint folder "
                        "(checkpoints/step_N), a run folder, or a plain state dict file")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. eval.cam_curve_interval=0.001 data.root=data")
    parser.add_argument("--split", nargs="+", metavar="SPLIT", help="split(s) to evaluate (default: eval.split)")
    parser.add_argument("--map-kind", nargs="+", metavar="KIND",
                        help=f"map kind(s): {', '.join(MAP_KINDS)} or all (default: eval.map_kind)")
    parser.add_argument("--baseline", nargs="+", metavar="NAME", choices=BASELINES,
                        help=f"evaluate class-agnostic baseline maps instead of a model: {', '.join(BASELINES)}")
    parser.add_argument("--out", metavar="DIR", help="results folder (default: RUN_DIR/eval/SPLIT, "
                        "RUN_DIR/eval-baselines/SPLIT for --baseline)")
    parser.add_argument("--overlays", type=int, default=8, metavar="N",
                        help="images in the overlay grid (the split's first N; 0: none)")
    parser.add_argument("--no-per-class", dest="per_class", action="store_false",
                        help="skip the per-class breakdown (one metric state instead of one per class)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write each rank's raw maps to OUT/maps/rank<r>.npz (compressed)")


def resolve_config(args: argparse.Namespace) -> tuple[Config, Path | None, dict[str, torch.Tensor] | None]:
    """(config, checkpoint to evaluate, its weights if already read).

    The config is --config, else the run's config.toml, else the one a checkpoint carries, then the
    overrides. With --run, results go under that run folder (unless run_dir is overridden).
    """
    run = Path(args.run) if args.run else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else run
    state_dict = None
    if args.config:
        cfg = load_config(args.config, args.overrides)
    elif run is not None and (run / "config.toml").is_file():
        cfg = load_config(run / "config.toml", args.overrides)
    elif checkpoint is not None and not args.baseline:
        state_dict, saved = load_weights(checkpoint)
        if saved is None:
            raise ConfigError(f"{checkpoint}: holds no config; pass --config")
        cfg = with_overrides(saved, args.overrides)
    else:
        raise ConfigError("no config: pass --config TOML, --run RUN_DIR, or a --checkpoint that carries its config")
    if run is not None and not any(o.strip().startswith("run_dir=") for o in args.overrides):
        cfg = dataclasses.replace(cfg, run_dir=str(run))
    return cfg, checkpoint, state_dict


def main(args: argparse.Namespace) -> int:
    try:
        cfg, checkpoint, state_dict = resolve_config(args)
        kinds = _map_kinds(args, cfg)
        splits = args.split or [cfg.eval.split]
        if args.overlays < 0:
            raise ConfigError(f"--overlays must be >= 0, got {args.overlays}")
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"calm-fast eval: {error}", file=sys.stderr)
        return 2
    if checkpoint is None and not args.baseline:
        print("calm-fast eval: nothing to evaluate: pass --checkpoint, --run or --baseline", file=sys.stderr)
        return 2

    from calm_fast.distributed import init_world, shutdown_world

    world = init_world(cfg.dist.timeout_minutes)
    try:
        return _run(args, cfg, checkpoint, state_dict, splits, kinds, world)
    except Exception as error:
        if world.world_size == 1:
            raise
        import traceback

        traceback.print_exc()
        print(f"[calm-fast] eval rank {world.rank} failed: {type(error).__name__}: {error}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        shutdown_world()


def _map_kinds(args: argparse.Namespace, cfg: Config) -> tuple[str, ...]:
    for value in (args.map_kind or []) + (args.split or []):
        if "=" in value:
            raise ConfigError(f"{value!r} looks like a config override: put overrides before --map-kind/--split")
    if args.baseline:
        return tuple(args.baseline)
    if not args.map_kind:
        kinds = (effective_map_kind(cfg),)
    elif args.map_kind == ["all"]:
        kinds = ("class",) if cfg.model.method == "cam" else MAP_KINDS
    else:
        kinds = tuple(args.map_kind)
    check_map_kinds(kinds, cfg.model.method)
    return kinds


def _run(args, cfg: Config, checkpoint: Path | None, state_dict: dict[str, torch.Tensor] | None, splits: list[str],
         kinds: tuple[str, ...], world) -> int:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs: wide enough for the results table
    share_cpu_threads(world)
    settings = EvalSettings.from_config(cfg, per_class=args.per_class, overlay_count=args.overlays,
                                        save_maps=args.save_maps)
    info: dict[str, Any] = {"world_size": world.world_size}
    num_classes = cfg.data.num_classes
    if args.baseline:
        info.update(source="baseline", baselines=list(args.baseline))
    else:
        if state_dict is None:
            state_dict, _ = load_weights(checkpoint)
        num_classes = num_classes or _classes_of(state_dict, checkpoint)
        model = build_model_from(cfg, num_classes, state_dict).to(world.device).eval()
        info.update(source="model", checkpoint=str(checkpoint), backbone=cfg.model.backbone,
                    method=cfg.model.method, prior=cfg.model.prior)
    for split_name in splits:
        split = read_configured_split(cfg, split_name, num_classes)
        if args.baseline:
            source: MapFn = BaselineMaps(kinds)
        else:
            source = ModelMaps(model, cfg.model.method, kinds, cfg.model.prior, world.device)
        loader = build_eval_loader(cfg, split, world.rank, world.world_size, world.device)
        evaluation = evaluate_maps(source, split, loader, settings, progress=world.is_main and console.is_terminal)
        default_out = Path(cfg.run_dir) / ("eval-baselines" if args.baseline else "eval") / split_name
        out_dir = Path(args.out) / split_name if args.out and len(splits) > 1 else Path(args.out or default_out)
        if settings.save_maps:
            from calm_fast.report import save_npz

            save_npz(out_dir / "maps" / f"rank{world.rank:05d}.npz", **evaluation.saved_maps)
        if world.is_main:
            write_reports(evaluation, split, out_dir, info, settings, console=console)
            console.print(f"results: {out_dir / 'results.json'}")
    return 0


def _classes_of(state_dict: dict[str, torch.Tensor], checkpoint: Path) -> int:
    """The number of classes a checkpoint was trained for: the rows of its class head."""
    weight = state_dict.get("class_head.weight")
    if weight is None:
        raise ValueError(f"{checkpoint}: no class_head.weight; set data.num_classes")
    return int(weight.shape[0])
