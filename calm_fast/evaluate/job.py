"""The evaluation job of one rank: `evaluate_maps` runs a map source over this rank's shard of a split,
checks that the loader's samples agree with the split and that every sample is seen exactly once across
ranks, feeds every benchmark from the same maps (the WSOL metrics; cue localization from the maps of
every class: one forward pass per image for both), sums the ranks' integer states and returns the numbers
(identical on every rank), with the cost of each benchmark. `evaluate_model` is the same for a WSOL
model, as `calm-fast eval` and training's validation use it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from calm_fast.config import Config, effective_map_kind
from calm_fast.console import track
from calm_fast.data.loaders import build_eval_loader
from calm_fast.evaluate.attribution.cue import CueLocalization
from calm_fast.evaluate.headline import map_headline
from calm_fast.evaluate.maps import MapFn, ModelMaps, images_to_uint8
from calm_fast.evaluate.scoring import EvalSettings, MapMetrics, all_reduce_states, as_numpy, gather_to_all
from calm_fast.metrics import load_gt_mask, normalize_scoremaps, rescale_boxes


@dataclass
class Evaluation:
    """What `evaluate_maps` returns (identical on every rank).

    results: map name -> the metrics of `MapMetrics.results`; state: map name -> summed integer state;
    overlays: index -> (map name -> raw map, predicted class or None, the image as the loader gave it, uint8
    [S, S, 3]), the first images of the split (the grid never re-reads an original file: it may be one
    that only the converter's repair made readable);
    saved_maps: this rank's raw maps (only with settings.save_maps). cue: the summed `CueLocalization`
    (its results, state and overlay rows from every rank), or None. cost: forward passes per image,
    seconds and images/s, for the maps and per benchmark (`_cost`).
    """

    num_images: int
    results: dict[str, dict[str, Any]]
    state: dict[str, dict[str, np.ndarray]]
    overlays: dict[int, tuple[dict[str, np.ndarray], int | None, np.ndarray]] = field(default_factory=dict)
    saved_maps: dict[str, np.ndarray] | None = None
    seconds: float = 0.0
    cue: CueLocalization | None = None
    cost: dict[str, Any] = field(default_factory=dict)


def ground_truth(split, indices: np.ndarray, need_boxes: bool, need_masks: bool):
    """(boxes in the 224 frame, one [k,4] array per image | None; masks uint8 [B,224,224] | None)."""
    boxes = masks = None
    if need_boxes:
        sizes = split.image_sizes
        boxes = [np.asarray(rescale_boxes(split.boxes[i], tuple(int(v) for v in sizes[i]))) for i in indices]
    if need_masks:
        masks = np.stack([load_gt_mask(split.masks[i].paths, split.masks[i].ignore_path) for i in indices])
    return boxes, masks


def evaluate_maps(map_fn: MapFn, split, loader, settings: EvalSettings = EvalSettings(),
                  progress: bool = False, cue: CueLocalization | None = None,
                  heartbeat: Callable[[str], None] | None = None) -> Evaluation:
    """Score the maps of `map_fn` on `split`, with this rank's shard of the samples coming from `loader`.

    `loader` yields (images, labels, indices); indices address `split`. The WSOL metrics score the
    batches' `maps` (unless settings.wsol is False); `cue`, when given, scores their `class_maps`;
    `heartbeat(what)` is called after every batch (a `Watchdog.beat`).
    Collective when a process group is initialised: every rank calls it with its own shard and all get
    the same summed result. Raises if a sample is missing or evaluated twice across ranks, or if a
    loader's label disagrees with the split.
    """
    started = time.perf_counter()
    shard = _evaluate_shard(map_fn, split, loader, settings, progress, cue, heartbeat or (lambda what: None))
    return _combine_shards(shard, split, settings, started, cue)


@dataclass
class _Shard:
    """One rank's part of an evaluation, before the ranks are combined."""

    metrics: dict[str, MapMetrics] = field(default_factory=dict)
    seen: np.ndarray | None = None  # int64 [N]: how often each sample was evaluated here
    overlays: dict[int, tuple[dict[str, np.ndarray], int | None, np.ndarray]] = field(default_factory=dict)
    saved: dict[str, list[np.ndarray]] = field(default_factory=dict)
    described: tuple[list[str], bool] | None = None  # (map names, whether the source classifies)
    forward_passes: int = 0  # model inputs spent by the map source on this rank
    seconds: dict[str, float] = field(default_factory=lambda: {"maps": 0.0, "wsol": 0.0, "cue": 0.0})


def _evaluate_shard(map_fn: MapFn, split, loader, settings: EvalSettings, progress: bool,
                    cue: CueLocalization | None, heartbeat: Callable[[str], None]) -> _Shard:
    shard = _Shard(seen=np.zeros(len(split), np.int64))
    for batch_number, (images, labels, indices) in enumerate(track(loader, "eval", progress), 1):
        labels_np = as_numpy(labels).astype(np.int64)
        indices_np = as_numpy(indices).astype(np.int64)
        _check_batch(split, labels_np, indices_np)
        np.add.at(shard.seen, indices_np, 1)
        clock = time.perf_counter()
        batch = map_fn(images, labels, indices)
        raw_maps = {name: as_numpy(raw) for name, raw in batch.maps.items()}
        pred = None if batch.pred_classes is None else as_numpy(batch.pred_classes).astype(np.int64)
        shard.forward_passes += batch.forward_passes
        clock = _lap(shard.seconds, "maps", clock)
        shard.described = (list(raw_maps), pred is not None)
        if settings.wsol:
            if not shard.metrics:
                shard.metrics = {name: MapMetrics(split, settings, classifies=pred is not None) for name in raw_maps}
            # Ground truth is read once per batch and shared by every map.
            boxes, masks = ground_truth(split, indices_np, split.boxes is not None, split.masks is not None)
            for name, raw in raw_maps.items():
                names = [f"the {name!r} map of sample {i} ({split.image_ids[i]!r})" for i in indices_np.tolist()]
                shard.metrics[name].update(normalize_scoremaps(raw, names=names), labels_np, pred, boxes, masks)
            clock = _lap(shard.seconds, "wsol", clock)
        if cue is not None:
            if batch.class_maps is None:
                raise ValueError("cue localization needs every class's map; this map source gives only one map "
                                 "per image (class-agnostic baselines have none)")
            cue.update(batch.class_maps, labels_np, indices_np)
            _lap(shard.seconds, "cue", clock)
        for row, index in enumerate(indices_np.tolist()):
            if index < settings.overlay_count:
                shard.overlays[index] = ({name: raw[row].astype(np.float32) for name, raw in raw_maps.items()},
                                         None if pred is None else int(pred[row]),
                                         images_to_uint8(images[row:row + 1])[0])
        if settings.save_maps:
            kept = {f"map_{name}": raw.astype(np.float32) for name, raw in raw_maps.items()}
            kept.update(indices=indices_np, labels=labels_np)
            if pred is not None:
                kept["pred_classes"] = pred
            for key, value in kept.items():
                shard.saved.setdefault(key, []).append(value)
        heartbeat(f"eval batch {batch_number} of {split.split}")
    return shard


def _lap(seconds: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    seconds[name] += now - since
    return now


def _combine_shards(shard: _Shard, split, settings: EvalSettings, started: float,
                    cue: CueLocalization | None) -> Evaluation:
    """Sum the ranks' states (one all_reduce) and compute the numbers, identically on every rank."""
    # A rank whose shard was empty learns the map names and whether the source classifies from the others.
    described = next((d for d in gather_to_all(shard.described) if d is not None), None)
    if described is None:
        raise ValueError(f"{split.metadata_dir}: the loader gave no sample on any rank")
    names, classifies = described
    names = names if settings.wsol else []
    metrics = {name: shard.metrics.get(name) or MapMetrics(split, settings, classifies) for name in names}

    states = [{"seen": shard.seen, "forward_passes": np.array(shard.forward_passes, np.int64)}]
    states += [metrics[name].state() for name in names] + ([cue.state()] if cue is not None else [])
    summed_seen, *summed = all_reduce_states(states)
    _check_coverage(split, summed_seen["seen"])
    results, state = {}, {}
    for name, total in zip(names, summed):
        metrics[name].load_state(total)
        results[name] = metrics[name].results()
        state[name] = total
    if cue is not None:
        cue.load_state(summed[-1])
        for part in gather_to_all(cue.overlays):
            cue.overlays.update(part)
        state["cue"] = summed[-1]
    overlays = {}
    for part in gather_to_all(shard.overlays):
        overlays.update(part)
    saved_maps = {key: np.concatenate(value) for key, value in shard.saved.items()} if settings.save_maps else None
    cost = _cost(len(split), int(summed_seen["forward_passes"]), gather_to_all(shard.seconds), settings.wsol, cue)
    return Evaluation(num_images=len(split), results=results, state=state, overlays=overlays,
                      saved_maps=saved_maps, seconds=time.perf_counter() - started, cue=cue, cost=cost)


def _cost(num_images: int, forward_passes: int, seconds: list[dict[str, float]], wsol: bool,
          cue: CueLocalization | None) -> dict[str, Any]:
    """What the evaluation cost: model inputs per image in all, and per part the seconds of the slowest
    rank. The maps (forward passes included) are computed once and shared; a benchmark's images/s is the
    rate it would run at alone, maps included: images / (maps + its own seconds)."""
    slowest = {name: max(rank[name] for rank in seconds) for name in seconds[0]}
    cost: dict[str, Any] = {"forward_passes_per_image": forward_passes / num_images,
                            "maps_seconds": round(slowest["maps"], 3), "benchmarks": {}}
    for name, used in (("wsol", wsol), ("cue", cue is not None)):
        if used:
            total = slowest["maps"] + slowest[name]
            cost["benchmarks"][name] = {"seconds": round(slowest[name], 3), "extra_forward_passes_per_image": 0,
                                        "images_per_second": num_images / total if total > 0 else None}
    return cost


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


def evaluate_model(model: torch.nn.Module, split, cfg: Config, world=None, dtype: torch.dtype | None = None,
                   loader=None, map_kinds: tuple[str, ...] | None = None,
                   settings: EvalSettings | None = None, progress: bool = False,
                   heartbeat: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Localization metrics of `model` on `split` through `evaluate_maps` (training's validation passes its
    one val loader; without `loader`, one is built with eval.batch_size). Collective when a process group
    is initialised.

    Returns the headline numbers of the first map kind (default: the config's) as top-level scalars
    (`calm_fast.evaluate.headline.map_headline`: `cls_top1_acc`, `max_box_acc`, `max_box_acc_v2`,
    `top1_loc` (v1: IoU 0.5, one box), `pxap`; absent when they do not apply), plus "map_kind",
    "num_images" and "maps" (every kind's full results) and "evaluation" (the `Evaluation`). The model's train/eval mode is restored afterwards.
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
        evaluation = evaluate_maps(source, split, loader, settings, progress=progress, heartbeat=heartbeat)
    finally:
        model.train(was_training)
    return {**map_headline(evaluation.results[map_kinds[0]]), "map_kind": map_kinds[0],
            "num_images": evaluation.num_images, "maps": evaluation.results, "evaluation": evaluation}

