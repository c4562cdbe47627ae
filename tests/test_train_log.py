"""calm_fast.train.log: the run record cut back to a checkpoint's step on resume."""

from __future__ import annotations

import json

from calm_fast.train.log import truncate_metrics


def test_truncate_metrics_keeps_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
