"""The exact, mergeable state of remove-and-classify (CALM.md §4): integer counts of correct predictions.

For each erased fraction k the state counts, over the images seen, the correct predictions after erasing
the top-k pixels of each map (one row per map name) and after erasing as many random pixels (one row: the
random erasure does not depend on the map), plus the clean predictions. Everything is int64, so the state
of shards summed element-wise (``merge`` or an all-reduce of ``state_dict()``) equals the one-pass state.

    R_k(map) = Σ correct(top-k of map erased) / Σ correct(k random pixels erased)

pooled over the split and not conditioned on the clean prediction; lower is better. The accumulation
itself (ranking, masking, classifying) lives in ``calm_fast.evaluate.attribution.remove_classify``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calm_fast.metrics.counts import load_counts

# The erased fractions of the paper (10, 30, 50, 70, 90 % of the input's pixels).
FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def erased_pixel_count(fraction: float, num_pixels: int) -> int:
    """Pixels erased at `fraction`: int(fraction · num_pixels), a float product truncated, as the reference."""
    return int(fraction * num_pixels)


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions: expected erased fractions in (0, 1), got {fractions}")
    if len(set(fractions)) != len(fractions):
        raise ValueError(f"fractions: each fraction once, got {fractions}")
    return fractions


class RemoveClassifyCounts:
    """Integer counts of remove-and-classify over (a shard of) a split, for the maps in `map_names`.

    num_images: images counted; clean_correct: correct clean predictions; random_correct int64 [F]:
    correct after random erasure at each fraction; top_correct int64 [M, F]: correct after erasing the
    top pixels of map m at each fraction.
    """

    def __init__(self, map_names: Sequence[str], fractions: Sequence[float] = FRACTIONS):
        self.map_names = tuple(map_names)
        if not self.map_names or len(set(self.map_names)) != len(self.map_names):
            raise ValueError(f"map_names: expected distinct names, got {self.map_names}")
        self.fractions = check_fractions(fractions)
        self.num_images = np.zeros((), np.int64)
        self.clean_correct = np.zeros((), np.int64)
        self.random_correct = np.zeros(len(self.fractions), np.int64)
        self.top_correct = np.zeros((len(self.map_names), len(self.fractions)), np.int64)

    def add(self, num_images: int, clean_correct: int, random_correct, top_correct) -> None:
        """Add one batch's counts (random_correct [F], top_correct [M, F], integers)."""
        random_correct = np.asarray(random_correct)
        top_correct = np.asarray(top_correct)
        if random_correct.shape != self.random_correct.shape or top_correct.shape != self.top_correct.shape:
            raise ValueError(f"counts of shapes {random_correct.shape}, {top_correct.shape}; expected "
                             f"{self.random_correct.shape}, {self.top_correct.shape}")
        for name, value in (("random_correct", random_correct), ("top_correct", top_correct)):
            if not np.issubdtype(value.dtype, np.integer):
                raise ValueError(f"{name} must hold integer counts, got dtype {value.dtype}")
        self.num_images += int(num_images)
        self.clean_correct += int(clean_correct)
        self.random_correct += random_correct.astype(np.int64)
        self.top_correct += top_correct.astype(np.int64)

    def merge(self, other: "RemoveClassifyCounts") -> "RemoveClassifyCounts":
        """Add another shard's counts (same maps and fractions) into this one; returns self."""
        if other.map_names != self.map_names or other.fractions != self.fractions:
            raise ValueError(f"cannot merge counts of maps {other.map_names} at {other.fractions} into maps "
                             f"{self.map_names} at {self.fractions}")
        self.add(int(other.num_images), int(other.clean_correct), other.random_correct, other.top_correct)
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The exact state as int64 arrays; summing it over ranks merges the shards."""
        return {"num_images": self.num_images.copy(), "clean_correct": self.clean_correct.copy(),
                "random_correct": self.random_correct.copy(), "top_correct": self.top_correct.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the state with `state` (arrays or tensors of the same names and shapes, integer)."""
        load_counts(self, state, self.state_dict())

    def compute(self) -> dict:
        """R_k per map and the accuracies behind it (percent), from the pooled counts.

        Keys: fractions, num_images, clean_accuracy, random_accuracy [F], maps {name: {r_k [F],
        top_accuracy [F]}}. R_k is None where no random-erased image was classified correctly (0/0 or x/0).
        """
        images = int(self.num_images)
        if images == 0:
            raise RuntimeError("RemoveClassifyCounts.compute() called before any image was added")

        def percent(count) -> float:
            return 100.0 * float(count) / images

        random = [int(c) for c in self.random_correct]
        maps = {}
        for row, name in enumerate(self.map_names):
            top = [int(c) for c in self.top_correct[row]]
            maps[name] = {"r_k": [t / r if r else None for t, r in zip(top, random)],
                          "top_accuracy": [percent(t) for t in top]}
        return {"fractions": list(self.fractions), "num_images": images,
                "clean_accuracy": percent(self.clean_correct),
                "random_accuracy": [percent(r) for r in random], "maps": maps}
