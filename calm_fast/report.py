"""Reports of an evaluation: a rich table, results.json, plots, an overlay grid and a per-class breakdown.

Everything here turns numbers that `calm_fast.evaluate` computed into something to look at; nothing here
computes a metric. Every file is written atomically (`calm_fast.atomic`), so a killed job never leaves a
half-written report that looks complete. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from calm_fast.atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "OverlayItem",
    "results_table",
    "per_class_table",
    "print_results",
    "plot_box_accuracy",
    "plot_pr_curve",
    "plot_overlay_grid",
    "plot_per_class",
    "write_per_class_csv",
    "series_table",
    "plot_series",
]


def _save_figure(figure, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
    """matplotlib's pyplot on the Agg backend. Imported on the first plot: matplotlib is slow to import and
    only the report files need it; the backend must be chosen before pyplot is imported."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------ tables


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def results_table(results: dict, title: str | None = None):
    """A rich Table with one row per map of one evaluated split (the `results.json` structure).

    Columns: classification accuracy; MaxBoxAcc (v1) with its top-1 localization; MaxBoxAccV2, its value
    per IoU threshold and its top-1 localization (mean over IoU thresholds); PxAP. Columns that apply to
    no map are left out; a number that does not apply to one map is a dash.
    """
    maps: dict = results["maps"]
    any_box = any(m.get("box") for m in maps.values())
    any_mask = any(m.get("mask") for m in maps.values())
    iou_keys = next((list(m["box"]["max_box_acc_per_iou"]) for m in maps.values() if m.get("box")), [])
    title = title or f"{results.get('dataset', '?')} {results.get('split', '?')} · {results.get('num_images', '?')} images"
    table = Table(title=title, title_justify="left")
    table.add_column("map", style="bold")
    table.add_column("top-1 cls", justify="right")
    if any_box:
        table.add_column("MaxBoxAcc", justify="right")
        table.add_column("top-1 loc", justify="right")
        table.add_column("MaxBoxAccV2", justify="right", style="bold green")
        for key in iou_keys:
            table.add_column(f"δ={key}", justify="right")
        table.add_column("top-1 loc V2", justify="right")
    if any_mask:
        table.add_column("PxAP", justify="right", style="bold green")
    for kind, metrics in maps.items():
        row = [kind, _fmt(metrics.get("cls_top1_acc"))]
        box = metrics.get("box")
        if any_box and box:
            row += [_fmt(box["max_box_acc"]), _fmt(box["v1"]["top1_loc"]), _fmt(box["max_box_acc_v2"])]
            row += [_fmt(box["max_box_acc_per_iou"].get(key)) for key in iou_keys]
            row.append(_fmt(box["top1_loc_v2"]))
        elif any_box:
            row += ["–"] * (4 + len(iou_keys))
        if any_mask:
            row.append(_fmt((metrics.get("mask") or {}).get("pxap")))
        table.add_row(*row)
    repairs = results.get("repairs") or {}
    counted = [f"{kind} {count}" for source in ("metadata", "images")
               for kind, count in (repairs.get(source) or {}).items()]
    if counted:
        table.caption = "data repaired (counted): " + ", ".join(counted)
    return table


def series_table(title: str, x_labels: Sequence[str], rows: dict[str, Sequence[float | None]],
                 first_column: str = "map", digits: int = 2, caption: str | None = None):
    """A rich Table with one row per named series (label -> one value per x), e.g. R_k per method."""
    table = Table(title=title, title_justify="left", caption=caption)
    table.add_column(first_column, style="bold")
    for label in x_labels:
        table.add_column(label, justify="right")
    for name, values in rows.items():
        if len(values) != len(x_labels):
            raise ValueError(f"series_table: row {name!r} has {len(values)} values for {len(x_labels)} columns")
        table.add_row(name, *[_fmt(value, digits) for value in values])
    return table


def per_class_table(rows: Sequence[dict], title: str = "per class", limit: int = 10):
    """A rich Table of the per-class breakdown: all classes when few, else the `limit` worst and best.

    Rows are sorted by their localization score (MaxBoxAccV2-style at the split's best thresholds, or
    PxAP), worst first, which is the order someone debugging a model wants.
    """
    ordered = sorted(rows, key=_class_sort_key)
    if len(ordered) > 2 * limit:
        shown = ordered[:limit] + [None] + ordered[-limit:]
    else:
        shown = ordered
    has_box = any(r.get("box_acc_v2") is not None for r in rows)
    has_mask = any("pxap" in r for r in rows)
    table = Table(title=title, title_justify="left")
    table.add_column("class", justify="right")
    table.add_column("images", justify="right")
    table.add_column("top-1 cls", justify="right")
    if has_box:
        table.add_column("BoxAccV2*", justify="right")
        table.add_column("top-1 loc V2*", justify="right")
    if has_mask:
        table.add_column("PxAP", justify="right")
    for row in shown:
        if row is None:
            table.add_row("…", *[""] * (len(table.columns) - 1))
            continue
        cells = [str(row["class"]), str(row["num_images"]), _fmt(row.get("cls_top1_acc"))]
        if has_box:
            cells += [_fmt(row.get("box_acc_v2")), _fmt(row.get("top1_loc_v2"))]
        if has_mask:
            cells.append(_fmt(row.get("pxap")))
        table.add_row(*cells)
    table.caption = "* at the thresholds that are best for the whole split" if has_box else None
    return table


def _class_sort_key(row: dict) -> tuple:
    score = row.get("box_acc_v2")
    if score is None:
        score = row.get("pxap")
    return (math.inf if score is None else score, row["class"])


def print_results(results: dict, console=None, per_class_limit: int = 10) -> None:
    """Print the results table and, for each map kind, the per-class breakdown; then the cue-localization
    table when the results have one."""
    console = console or Console()
    if results["maps"]:
        console.print(results_table(results))
    for kind, metrics in results["maps"].items():
        rows = metrics.get("per_class")
        if rows and len(rows) > 1:
            console.print(per_class_table(rows, title=f"{kind} map, per class", limit=per_class_limit))
    if results.get("cue"):
        title = f"cue localization PxAP · {results.get('dataset', '?')} {results.get('split', '?')}"
        console.print(cue_table(results["cue"], title=title))
        for line in results["cue"].get("checks", []):
            console.print(line)
        for name, reason in (results["cue"].get("excluded") or {}).items():
            console.print(f"{name}: not scored by cue localization: {reason}")


# ------------------------------------------------------------------------------------------------- plots


def plot_box_accuracy(
    path: str | os.PathLike,
    thresholds: np.ndarray,
    curves: dict[str, np.ndarray],
    title: str = "BoxAcc against the score-map threshold",
) -> Path:
    """One line per curve (label -> BoxAcc in percent at each threshold), its maximum marked."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves.items():
        curve = np.asarray(curve, dtype=np.float64)
        (line,) = axis.plot(thresholds, curve, label=label, linewidth=1.6)
        best = int(np.argmax(curve))  # the first maximum, as the metric picks it
        axis.plot([thresholds[best]], [curve[best]], "o", color=line.get_color())
        axis.annotate(f"{curve[best]:.1f} @ {thresholds[best]:.2f}", (thresholds[best], curve[best]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8, color=line.get_color())
    axis.set_xlabel("threshold τ (fraction of the map's maximum)")
    axis.set_ylabel("BoxAcc (%)")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right", fontsize=8)
    axis.set_title(title, fontsize=10)
    return _save_figure(figure, path)


def plot_pr_curve(path: str | os.PathLike, precision: np.ndarray, recall: np.ndarray, pxap: float,
                  title: str = "pixel precision-recall") -> Path:
    """The PR curve of the pooled pixel histograms; points with undefined precision (0/0) are skipped."""
    plt = _pyplot()
    precision = np.asarray(precision, dtype=np.float64)
    recall = np.asarray(recall, dtype=np.float64)
    defined = np.isfinite(precision) & np.isfinite(recall)
    figure, axis = plt.subplots(figsize=(4.8, 4.4))
    axis.step(recall[defined], precision[defined], where="post", linewidth=1.6)
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.set_title(f"{title} · PxAP {pxap:.2f}", fontsize=10)
    return _save_figure(figure, path)


def plot_series(path: str | os.PathLike, x: Sequence[float], series: dict[str, Sequence[float | None]],
                xlabel: str, ylabel: str, title: str, reference: float | None = None) -> Path:
    """One line with markers per named series (label -> y per x; None leaves a gap), and an optional
    dashed horizontal reference line (e.g. R_k = 1: as good as random)."""
    if not series:
        raise ValueError("plot_series: no series to draw")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, values in series.items():
        y = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
        if len(y) != len(x):
            raise ValueError(f"plot_series: series {label!r} has {len(y)} values for {len(x)} x positions")
        axis.plot(x, y, marker="o", linewidth=1.6, markersize=4, label=label)
    if reference is not None:
        axis.axhline(reference, color="grey", linestyle="--", linewidth=1.0)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="best")
    axis.set_title(title, fontsize=10)
    return _save_figure(figure, path)


@dataclass
class OverlayItem:
    """One cell of the overlay grid, everything in the 224×224 metric frame.

    image: uint8 [224, 224, 3] RGB; scoremap: float [224, 224] in [0, 1]; gt_boxes / pred_boxes: int
    [k, 4] (x0, y0, x1, y1), inclusive ends; gt_mask: optional uint8 [224, 224] (1 = object, 255 = ignore).
    """

    image: np.ndarray
    scoremap: np.ndarray
    title: str
    gt_boxes: np.ndarray | None = None
    pred_boxes: np.ndarray | None = None
    gt_mask: np.ndarray | None = None


def _draw_boxes(axis, boxes: np.ndarray | None, colour: str, style: str) -> None:
    from matplotlib.patches import Rectangle  # matplotlib on use (see _pyplot)

    if boxes is None:
        return
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        # Inclusive pixel ends: the box covers pixel centres x0..x1, so its outline spans x0-0.5..x1+0.5.
        axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                                 edgecolor=colour, linewidth=1.5, linestyle=style))


def plot_overlay_grid(path: str | os.PathLike, items: Sequence[OverlayItem], columns: int = 4,
                      title: str | None = None) -> Path:
    """A grid of images, each with its score map blended in, GT boxes (green) and predicted boxes (red,
    dashed); a GT mask is drawn as a green outline."""
    if not items:
        raise ValueError("plot_overlay_grid: no item to draw")
    plt = _pyplot()
    columns = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.8 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, item in zip(axes.ravel(), items):
        axis.imshow(item.image, interpolation="nearest")
        axis.imshow(item.scoremap, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0, interpolation="nearest")
        if item.gt_mask is not None:
            axis.contour(item.gt_mask == 1, levels=[0.5], colors="lime", linewidths=1.0)
        _draw_boxes(axis, item.gt_boxes, "lime", "-")
        _draw_boxes(axis, item.pred_boxes, "red", "--")
        axis.set_title(item.title, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save_figure(figure, path)


def plot_per_class(path: str | os.PathLike, rows: Sequence[dict], key: str, label: str,
                   title: str = "per-class breakdown") -> Path:
    """A bar per class of `rows[i][key]` (classes without a value are left out), sorted by value."""
    plt = _pyplot()
    values = [(row["class"], row[key]) for row in rows if row.get(key) is not None]
    if not values:
        raise ValueError(f"plot_per_class: no class has a value for {key!r}")
    values.sort(key=lambda item: item[1])
    figure, axis = plt.subplots(figsize=(max(4.0, min(0.25 * len(values), 24.0)), 3.6))
    positions = np.arange(len(values))
    axis.bar(positions, [v for _, v in values], color="tab:blue")
    if len(values) <= 50:
        axis.set_xticks(positions, [str(c) for c, _ in values], fontsize=7)
    else:
        axis.set_xticks([])
    axis.set_xlabel("class (sorted)")
    axis.set_ylabel(label)
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.set_title(title, fontsize=10)
    return _save_figure(figure, path)


def write_per_class_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """The per-class rows as CSV (one column per key of the first row, in order), atomically."""
    if not rows:
        raise ValueError("write_per_class_csv: no row")
    columns = list(rows[0])
    lines = [",".join(columns)]
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                cells.append("")
            elif isinstance(value, float):
                cells.append(f"{value:.4f}")
            else:
                cells.append(str(value))
        lines.append(",".join(cells))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def cue_table(cue: dict, title: str = "cue localization"):
    """A rich Table of cue-localization PxAP: one row per map, mean PxAP per group of class pairs (the
    number of differing parts) with scored / evaluated pairs, and the pair-weighted mean, with the images
    each map was scored on (the gradient maps may use a subset). Maps with the reference's cumulative
    number get a second, labelled row."""
    maps: dict = cue["maps"]
    groups = sorted({int(g) for m in maps.values() for g in m["groups"]})
    table = Table(title=title, title_justify="left", caption=next(iter(maps.values()))["grid"] if maps else None)
    table.add_column("map", style="bold")
    table.add_column("images", justify="right")
    table.add_column("accumulator")
    for group in groups:
        table.add_column(f"{group} part{'s' if group > 1 else ''} (pairs)", justify="right")
    table.add_column("mean (pair-weighted)", justify="right", style="bold green")
    for name, metrics in maps.items():
        sections = [("fresh per pair", metrics)]
        if metrics.get("cumulative"):
            sections.append(("cumulative (reference)", metrics["cumulative"]))
        for label, numbers in sections:
            row = [name, str(metrics.get("num_images", "?")), label]
            for group in groups:
                entry = numbers["groups"].get(group) or numbers["groups"].get(str(group))
                row.append("–" if entry is None else
                           f"{_fmt(entry['mean_pxap'])} ({entry['num_scored']}/{entry['num_pairs']})")
            row.append(_fmt(numbers["mean_pxap"]))
            table.add_row(*row)
    return table
