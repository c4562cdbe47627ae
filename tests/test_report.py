"""calm_fast.report: tables, plots, the per-class CSV and the overlay grid (atomic files: test_atomic.py)."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest
from rich.console import Console

from calm_fast import report


def _render(renderable) -> str:
    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(renderable)
    return console.export_text()


def _png(path) -> np.ndarray:
    """Decode a PNG written by report (RGB uint8)."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image[..., ::-1]


def _leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- files


def test_per_class_csv(tmp_path):
    rows = [{"class": 0, "num_images": 4, "cls_top1_acc": 75.0, "pxap": None},
            {"class": 1, "num_images": 2, "cls_top1_acc": 50.0, "pxap": float("nan")}]
    path = report.write_per_class_csv(tmp_path / "c.csv", rows)
    assert path.read_text().splitlines() == ["class,num_images,cls_top1_acc,pxap", "0,4,75.0000,", "1,2,50.0000,"]
    with pytest.raises(ValueError, match="no row"):
        report.write_per_class_csv(tmp_path / "empty.csv", [])


# ------------------------------------------------------------------------------------------ tables


def _results():
    box = {"max_box_acc": 61.25, "max_box_acc_v2": 55.5, "max_box_acc_per_iou": {"30": 80.0, "50": 60.0, "70": 26.5},
           "v1": {"top1_loc": 51.0}, "top1_loc_v2": 47.0}
    return {"dataset": "SYNTH", "split": "test", "num_images": 40,
            "maps": {"joint": {"cls_top1_acc": 87.5, "box": box, "mask": {"pxap": 44.44}},
                     "prior": {"cls_top1_acc": None, "box": None, "mask": None}}}


def test_results_table_shows_each_number_and_dashes_for_missing_ones():
    text = _render(report.results_table(_results()))
    joint = next(line for line in text.splitlines() if "joint" in line)
    cells = [cell.strip() for cell in joint.split("│")[1:-1]]
    assert cells == ["joint", "87.50", "61.25", "51.00", "55.50", "80.00", "60.00", "26.50", "47.00", "44.44"]
    prior = next(line for line in text.splitlines() if "prior" in line)
    assert [cell.strip() for cell in prior.split("│")[1:-1]] == ["prior"] + ["–"] * 9


def test_per_class_table_lists_worst_first_and_elides_the_middle():
    rows = [{"class": c, "num_images": 5, "cls_top1_acc": 100.0, "box_acc_v2": float(score), "top1_loc_v2": 1.0}
            for c, score in enumerate([50, 10, 90, 30, 70, 20, 80, 40, 60])]
    text = _render(report.per_class_table(rows, limit=2))
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]
    body = [row[0] for row in cells if row and row[0] not in ("", "class")]
    # classes by score: 1 (10), 5 (20), ..., 6 (80), 2 (90)
    assert body == ["1", "5", "…", "6", "2"]
    full = _render(report.per_class_table(rows, limit=10))
    assert "…" not in full


# ------------------------------------------------------------------------------------------- plots


def test_box_accuracy_plot_is_a_png(tmp_path):
    thresholds = np.arange(0, 1, 0.01)
    curves = {"δ=50": 100 * np.exp(-((thresholds - 0.3) ** 2) / 0.02)}
    path = report.plot_box_accuracy(tmp_path / "boxacc.png", thresholds, curves)
    image = _png(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert _leftovers(tmp_path) == []


def test_pr_curve_skips_undefined_precision(tmp_path):
    precision = np.array([np.nan, 1.0, 0.8, 0.5])
    recall = np.array([0.0, 0.1, 0.6, 1.0])
    path = report.plot_pr_curve(tmp_path / "pr.png", precision, recall, pxap=63.0)
    assert _png(path).ndim == 3


def _red_pixels(image: np.ndarray) -> int:
    r, g, b = (image[..., c].astype(int) for c in range(3))
    return int(((r > 200) & (g < 70) & (b < 70)).sum())


def _green_pixels(image: np.ndarray) -> int:
    r, g, b = (image[..., c].astype(int) for c in range(3))
    return int(((g > 200) & (r < 70) & (b < 70)).sum())


def test_overlay_grid_draws_gt_in_green_and_predictions_in_red(tmp_path):
    grey = np.full((224, 224, 3), 128, np.uint8)
    blank = np.zeros((224, 224))
    with_boxes = report.OverlayItem(image=grey, scoremap=blank, title="a",
                                    gt_boxes=np.array([[20, 30, 120, 150]]), pred_boxes=np.array([[60, 60, 200, 200]]))
    no_boxes = report.OverlayItem(image=grey, scoremap=blank, title="b")
    drawn = _png(report.plot_overlay_grid(tmp_path / "with.png", [with_boxes]))
    plain = _png(report.plot_overlay_grid(tmp_path / "without.png", [no_boxes]))
    assert _red_pixels(drawn) > 50 and _green_pixels(drawn) > 50
    assert _red_pixels(plain) == 0 and _green_pixels(plain) == 0
    gt_only = report.OverlayItem(image=grey, scoremap=blank, title="c", gt_boxes=np.array([[20, 30, 120, 150]]))
    gt_drawn = _png(report.plot_overlay_grid(tmp_path / "gt.png", [gt_only]))
    assert _red_pixels(gt_drawn) == 0 and _green_pixels(gt_drawn) > 50


def test_overlay_grid_lays_out_rows_and_columns(tmp_path):
    item = report.OverlayItem(image=np.zeros((224, 224, 3), np.uint8), scoremap=np.zeros((224, 224)), title="x")
    one_row = _png(report.plot_overlay_grid(tmp_path / "a.png", [item] * 4, columns=4))
    two_rows = _png(report.plot_overlay_grid(tmp_path / "b.png", [item] * 8, columns=4))
    assert one_row.shape[1] / one_row.shape[0] > 2.5  # four cells side by side
    assert math.isclose(two_rows.shape[1], one_row.shape[1], rel_tol=0.05)
    assert two_rows.shape[0] > 1.6 * one_row.shape[0]
    with pytest.raises(ValueError, match="no item"):
        report.plot_overlay_grid(tmp_path / "c.png", [])


def test_per_class_plot(tmp_path):
    rows = [{"class": c, "box_acc_v2": 10.0 * c} for c in range(5)] + [{"class": 5, "box_acc_v2": None}]
    assert _png(report.plot_per_class(tmp_path / "p.png", rows, "box_acc_v2", "BoxAccV2")).ndim == 3
    with pytest.raises(ValueError, match="no class has a value"):
        report.plot_per_class(tmp_path / "q.png", rows[-1:], "box_acc_v2", "BoxAccV2")
