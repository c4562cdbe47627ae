"""The files of one evaluated split, written by rank 0: results.json (every number, curves included, the
cue-localization results and each benchmark's cost), metric_state.npz (the summed integer state), BoxAcc
and PR plots, the per-class CSV and plot, the overlay grid (image, normalised map, GT and predicted
boxes), the grid of cue maps (image, |map_y1 - map_y2|, the differing parts), and the tables on the
console. The drawing itself is `calm_fast.report`'s; this module decides what goes into each file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from calm_fast import report
from calm_fast.atomic import save_npz, write_json
from calm_fast.evaluate.attribution.benchmarks import remove_classify_report
from calm_fast.evaluate.attribution.cue import CueLocalization
from calm_fast.evaluate.headline import headline_numbers
from calm_fast.evaluate.job import Evaluation, ground_truth
from calm_fast.evaluate.scoring import V1_IOU, EvalSettings
from calm_fast.metrics import normalize_scoremaps
from calm_fast.metrics.cue_bins import normalize_rows_torch, resize_rows_torch
from calm_fast.metrics.contours import contour_boxes
from calm_fast.metrics.scoremaps import SCOREMAP_SIZE, integer_thresholds, quantize_scoremaps

RESULTS_FORMAT = "calm-fast-eval/1"


def write_reports(evaluation: Evaluation, split, out_dir: Path, info: dict[str, Any], settings: EvalSettings,
                  console=None, cue_cumulative: bool = True,
                  sections: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.json, metric_state.npz, plots, overlays and per-class files for one split (rank 0); with
    cue localization also its results (and the reference's cumulative number when `cue_cumulative`) and
    one grid of cue maps per map. `sections`: more benchmarks' results (e.g. "remove_classify"), added to
    results.json as they are; the "headline" (`headline_numbers`) covers them all."""
    out_dir = Path(out_dir)
    results = {"format": RESULTS_FORMAT, **info, "dataset": split.dataset, "split": split.split,
               "num_images": evaluation.num_images, "num_classes": split.num_classes,
               "cam_curve_interval": settings.cam_curve_interval,
               "iou_thresholds": list(settings.iou_thresholds), "multi_contour": settings.multi_contour,
               "seconds": round(evaluation.seconds, 3), "cost": evaluation.cost, "maps": evaluation.results,
               **(sections or {})}
    if evaluation.cue is not None:
        results["cue"] = evaluation.cue.results(cumulative=cue_cumulative)
        # The cost of its rows of gradient and control maps (those of the model's maps: cost.benchmarks.cue).
        attribution_cue = (results.get("attribution") or {}).get("cue")
        if attribution_cue:
            results["cue"]["attribution_cost"] = attribution_cue["cost"]
    results["headline"] = headline_numbers(results)
    write_json(out_dir / "results.json", results)
    save_npz(out_dir / "metric_state.npz", **{f"{name}/{key}": value for name, state in evaluation.state.items()
                                               for key, value in state.items()})
    for name, metrics in evaluation.results.items():
        _write_map_reports(out_dir, name, metrics, evaluation, split, settings)
    if evaluation.cue is not None and evaluation.cue.overlays:
        for name in evaluation.cue.map_names:
            images = {index: image for index, (_, _, image) in evaluation.overlays.items()}
            items = cue_overlay_items(evaluation.cue, split, name, images)
            report.plot_overlay_grid(out_dir / f"cue_{name}.png", items,
                                     title=f"{split.dataset} {split.split}, |{name} y1 - {name} y2| "
                                           "(stretched for display); differing parts outlined")
    report.print_results(results, console=console)
    if "remove_classify" in results:
        remove_classify_report(results, out_dir, console=console)
    return results


def cue_overlay_items(cue: CueLocalization, split, name: str, images: dict[int, np.ndarray], limit: int = 12) -> list:
    """The cue grid's cells: for the first images, one pair of each group: the image (`images`: the loader's,
    by split index, as `Evaluation.overlays` keeps them), the pair's score map (resized, |.|, normalised as
    scored, then stretched to [0, 1] for display) and the differing parts' mask, in the 224×224 frame."""
    chosen, groups_shown = [], set()
    for index, pair in sorted(cue.overlays):
        if name not in cue.overlays[(index, pair)]:  # a map of the attribution pass, beyond its first N images
            continue
        group = int(cue.truth.pairs.groups[pair])
        if (index, group) not in groups_shown and len(chosen) < limit:
            groups_shown.add((index, group))
            chosen.append((index, pair))
    items = []
    for index, pair in chosen:
        raw = torch.from_numpy(cue.overlays[(index, pair)][name])[None]
        scores = normalize_rows_torch(resize_rows_torch(raw, SCOREMAP_SIZE, SCOREMAP_SIZE), cue.normalization[name])[0]
        scores = scores.numpy().astype(np.float64)
        spread = scores.max() - scores.min()
        display = (scores - scores.min()) / spread if spread > 0 else np.zeros_like(scores)
        labels, _ = cue.truth.label_maps([index])
        mask = ((int(cue.truth.pairs.differing[pair]) >> np.minimum(labels[0], 62).astype(np.int64)) & 1)
        mask = np.where(labels[0] < 63, mask, 0).astype(np.uint8)
        image = cv2.resize(images[index], (SCOREMAP_SIZE, SCOREMAP_SIZE), interpolation=cv2.INTER_LINEAR)
        first, second = cue.truth.pairs.class_pairs[pair].tolist()
        parts = "+".join(cue.truth.pairs.differing_names(pair))
        items.append(report.OverlayItem(image=image, scoremap=display, gt_mask=mask,
                                        title=f"#{index} y={int(split.labels[index])}: {first} vs {second} ({parts})"))
    return items


def _write_map_reports(out_dir: Path, name: str, metrics: dict, evaluation: Evaluation, split,
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
    """The overlay grid's cells: image (the loader's, resized), normalised map, GT boxes/mask and the box
    predicted at the best threshold of MaxBoxAcc (v1: the largest contour), all in the 224×224 metric frame."""
    box = metrics.get("box")
    items = []
    for index in sorted(evaluation.overlays):
        maps, predicted, image = evaluation.overlays[index]
        scoremap = normalize_scoremaps([maps[name]])[0]
        image = cv2.resize(image, (SCOREMAP_SIZE, SCOREMAP_SIZE), interpolation=cv2.INTER_LINEAR)
        gt_boxes, gt_masks = ground_truth(split, np.array([index]), split.boxes is not None, split.masks is not None)
        pred_boxes = None
        if box:
            quantized = quantize_scoremaps(scoremap[None])
            level = integer_thresholds(quantized, np.array([box["v1"]["best_threshold"]]))[0, 0]
            pred_boxes = contour_boxes(quantized[0], int(level), multi_contour=False)
        label = int(split.labels[index])
        title = f"#{index} y={label}" + ("" if predicted is None else f" ŷ={predicted}")
        items.append(report.OverlayItem(image=image, scoremap=scoremap, title=title,
                                        gt_boxes=None if gt_boxes is None else gt_boxes[0], pred_boxes=pred_boxes,
                                        gt_mask=None if gt_masks is None else gt_masks[0]))
    return items
