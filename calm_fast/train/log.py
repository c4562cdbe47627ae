"""The record of a training run, written by rank 0: metrics.jsonl (one JSON record per line), TensorBoard
scalars and the progress bar, and the truncation of metrics.jsonl to a checkpoint's step on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calm_fast.atomic import atomic_write_text
from calm_fast.config import Config
from calm_fast.console import progress_bar
from calm_fast.distributed import World


class RunLog:
    """metrics.jsonl, TensorBoard scalars and the rich progress bar; active on rank 0 only."""

    def __init__(self, cfg: Config, world: World, total_steps: int, start_step: int):
        self.active = world.is_main
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.writer = None
        self.progress = None
        if not self.active:
            return
        if cfg.train.tensorboard:
            # Imported only when a run writes TensorBoard scalars: tensorboard is slow to import and optional.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"), purge_step=start_step or None)
        if cfg.train.progress:
            self.progress = progress_bar("train", status=True)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def record(self, entry: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            kind = entry.get("kind", "train")
            for key, value in entry.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, entry["step"])
        if self.progress is None:
            return
        if entry.get("kind") == "train":
            status = (f"loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {entry['images_per_s']:.0f} img/s")
            self.progress.update(self.task, completed=entry["step"], status=status)
        if not self.progress.console.is_terminal or entry.get("kind") != "train":
            self.progress.console.print(json.dumps(entry), soft_wrap=True, highlight=False, markup=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records after `last_step` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
