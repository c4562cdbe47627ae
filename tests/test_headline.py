"""The one home of the headline numbers (calm_fast/evaluate/headline.py): one map's WSOL numbers, as
validation and the demo read them, and the same numbers inside results.json's per-source headline.
(results.json's cue and remove-and-classify entries are pinned in test_eval_attribution.py.)"""

from __future__ import annotations

import math

from calm_fast.evaluate.headline import headline_numbers, map_headline


def _box_map_results(top1_loc):
    """One map's results in the shape MapMetrics.results gives them (a box dataset: no mask section)."""
    return {"cls_top1_acc": 87.5, "num_images": 8,
            "box": {"max_box_acc": 62.5, "max_box_acc_v2": 55.0, "max_box_acc_per_iou": {"0.3": 75.0},
                    "v1": {"top1_loc": top1_loc, "max_box_acc": {"0.5": 62.5}}}}


def test_map_headline_takes_the_quoted_numbers_and_leaves_out_what_does_not_apply():
    assert map_headline(_box_map_results(top1_loc=50.0)) == {
        "cls_top1_acc": 87.5, "max_box_acc": 62.5, "max_box_acc_v2": 55.0, "top1_loc": 50.0}
    # A baseline does not classify and has no top-1 localisation; a mask dataset has PxAP and no boxes.
    baseline = {"cls_top1_acc": None, "box": {"max_box_acc": 40.0, "max_box_acc_v2": 37.5, "v1": {"top1_loc": None}}}
    assert map_headline(baseline) == {"max_box_acc": 40.0, "max_box_acc_v2": 37.5}
    assert map_headline({"cls_top1_acc": 75.0, "mask": {"pxap": 61.25}}) == {"cls_top1_acc": 75.0, "pxap": 61.25}
    assert map_headline({"cls_top1_acc": math.nan, "mask": {"pxap": None}}) == {}


def test_results_headline_holds_the_same_wsol_numbers_as_map_headline():
    results = {"maps": {"joint": _box_map_results(top1_loc=50.0), "class": _box_map_results(top1_loc=None)}}
    assert headline_numbers(results) == {
        "joint": {"cls_top1_acc": 87.5, "max_box_acc": 62.5, "max_box_acc_v2": 55.0, "top1_loc": 50.0},
        "class": {"cls_top1_acc": 87.5, "max_box_acc": 62.5, "max_box_acc_v2": 55.0},
    }
