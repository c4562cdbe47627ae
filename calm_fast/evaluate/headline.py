"""The headline of an evaluation: the numbers people quote and compare across runs and seeds, numbers only.

`map_headline` gives one map's WSOL numbers (top-1 classification, MaxBoxAcc (v1, IoU 0.5), MaxBoxAccV2,
top-1 localisation (v1), PxAP): what `evaluate_model` returns to validation and what the demo prints.
`headline_numbers` gives results.json's "headline", per map source (a model map kind, "grad-<method>",
"control-<name>", a baseline): those WSOL numbers; cue-localization PxAP per group and the pair-weighted
mean (when cue localization ran); R_k per erased percentage k (remove-and-classify); plus the clean and
random accuracies of remove-and-classify. A number that does not apply is left out, never None, so a
reader can average every key it finds (benchmarks/seeds.py does).
"""

from __future__ import annotations

import math
from typing import Any


def _put(out: dict, key: str, value) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        out[key] = float(value)


def map_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """The WSOL numbers of one map's results (`MapMetrics.results`), each only where it applies."""
    row: dict[str, float] = {}
    box = metrics.get("box") or {}
    _put(row, "cls_top1_acc", metrics.get("cls_top1_acc"))
    _put(row, "max_box_acc", box.get("max_box_acc"))
    _put(row, "max_box_acc_v2", box.get("max_box_acc_v2"))
    _put(row, "top1_loc", (box.get("v1") or {}).get("top1_loc"))
    _put(row, "pxap", (metrics.get("mask") or {}).get("pxap"))
    return row


def headline_numbers(results: dict[str, Any]) -> dict[str, Any]:
    """{map source: {metric: number}} plus "remove-classify": {clean_accuracy, random_accuracy_<k>}."""
    out: dict[str, dict[str, float]] = {}
    for name, metrics in (results.get("maps") or {}).items():
        out.setdefault(name, {}).update(map_headline(metrics))
    for name, cue in ((results.get("cue") or {}).get("maps") or {}).items():
        row = out.setdefault(name, {})
        for group, values in (cue.get("groups") or {}).items():
            _put(row, f"cue_pxap_g{group}", values.get("mean_pxap"))
        _put(row, "cue_pxap_mean", cue.get("mean_pxap"))
    remove_classify = results.get("remove_classify")
    if remove_classify:
        ks = remove_classify["ks"]
        for name, values in remove_classify["maps"].items():
            row = out.setdefault(name, {})
            for k, r_k in zip(ks, values["r_k"]):
                _put(row, f"r_{k}", r_k)
        totals: dict[str, float] = {}
        _put(totals, "clean_accuracy", remove_classify["clean_accuracy"])
        for k, accuracy in zip(ks, remove_classify["random_accuracy"]):
            _put(totals, f"random_accuracy_{k}", accuracy)
        out["remove-classify"] = totals
    return {name: row for name, row in out.items() if row}
