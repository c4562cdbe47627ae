"""Ground truth of the cue-localization benchmark (CALM.md §4): class pairs, their differing parts, label maps.

Both modes give the same two things. `CuePairs`: the evaluated class pairs (those whose classes differ in 1,
2 or 3 parts), each with its group (the number of differing parts) and the set of differing part labels as
a bit mask, in the order the reference visits them (group, then y1 < y2). And per test image a part label
map at 224 x 224 (uint8: the part label of each pixel, `NO_PART` elsewhere) with the bit mask of the parts
visible in the image; the ground truth of an image for a pair is "label in the pair's differing set".
This module holds the shared types and the synthetic mode, whose classes are combinations of part variants
(the dataset's synthetic.json), so the differing parts and their pixels are known exactly from the part
label PNGs. The CUB mode (attributes, keypoints, segmentations) is `calm_fast.data.cub_parts`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from calm_fast.data.metadata import WSOLSplit
from calm_fast.data.metadata_files import MetadataError

CUE_SIZE = 224  # the frame of score maps and masks, as for every WSOL metric
NO_PART = 255  # label of a pixel that belongs to no part (never positive)
EVALUATED_GROUPS = (1, 2, 3)  # pairs differing in 1, 2 or 3 parts, as in the paper


@dataclass(frozen=True, eq=False)
class CuePairs:
    """The evaluated class pairs. `class_pairs` int64 [P, 2] (y1 < y2, 0-based labels); `groups` int64 [P]
    (number of differing parts); `differing` int64 [P] (bit l set: part label l differs); `label_names`
    (the name of each part label); `group_counts`: pairs per number of differing parts over all class
    pairs, evaluated or not (the checksum of the grouping)."""

    class_pairs: np.ndarray
    groups: np.ndarray
    differing: np.ndarray
    label_names: tuple[str, ...]
    group_counts: dict[int, int]
    num_classes: int

    def __len__(self) -> int:
        return len(self.groups)

    def differing_names(self, pair: int) -> list[str]:
        bits = int(self.differing[pair])
        return [name for label, name in enumerate(self.label_names) if bits >> label & 1]

    def pairs_of_class(self) -> np.ndarray:
        """int64 [K, M]: the pairs in which each class takes part, padded with -1."""
        members = [[] for _ in range(self.num_classes)]
        for pair, (first, second) in enumerate(self.class_pairs.tolist()):
            members[first].append(pair)
            members[second].append(pair)
        table = np.full((self.num_classes, max(1, max(len(m) for m in members))), -1, np.int64)
        for label, pairs in enumerate(members):
            table[label, :len(pairs)] = pairs
        return table


class CueTruth(Protocol):
    """What the benchmark needs from a dataset: the pairs, and label maps of test images."""

    pairs: CuePairs
    description: str
    checks: list[str]  # lines for the user: checks of the ground truth against published numbers

    def label_maps(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [B, 224, 224] part labels, NO_PART elsewhere; int64 [B] bit masks of the visible parts)."""


def build_pairs(differing: np.ndarray, label_names: Sequence[str],
                groups: Sequence[int] = EVALUATED_GROUPS) -> CuePairs:
    """CuePairs from `differing` int64 [K, K] (bit l of [i, j] set: classes i and j differ in part l).

    Pairs are ordered by group, then by (y1, y2): the order in which the reference visits them.
    """
    num_classes = len(differing)
    if len(label_names) > 63:
        raise ValueError(f"at most 63 part labels fit the bit masks, got {len(label_names)}")
    first, second = np.triu_indices(num_classes, k=1)
    bits = differing[first, second].astype(np.int64)
    group_of = np.array([bin(int(b)).count("1") for b in bits], np.int64)
    counts = {int(g): int(c) for g, c in zip(*np.unique(group_of, return_counts=True))}
    keep = np.flatnonzero(np.isin(group_of, list(groups)))
    keep = keep[np.lexsort((second[keep], first[keep], group_of[keep]))]
    return CuePairs(class_pairs=np.stack([first[keep], second[keep]], axis=1).astype(np.int64),
                    groups=group_of[keep], differing=bits[keep], label_names=tuple(label_names),
                    group_counts=counts, num_classes=num_classes)


def nearest_rows_cols(height: int, width: int, size: int = CUE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns of a nearest-neighbour resize to size x size: floor(d * src / size), as
    OpenCV's INTER_NEAREST (and the reference's GT masks) use."""
    return (np.arange(size) * height) // size, (np.arange(size) * width) // size


def visible_bits(label_map: np.ndarray) -> int:
    """Bit mask of the part labels that occur in a label map."""
    present = np.flatnonzero(np.bincount(label_map.ravel(), minlength=256)[:NO_PART])
    return int(sum(1 << int(label) for label in present))


class SyntheticCueTruth:
    """The synthetic datasets' cue ground truth: differing slots from synthetic.json, pixels from part PNGs.

    A class is a combination of variants of the class slots (head, tail, crest); two classes differ in the
    slots whose variants differ, and the group of a pair is their number. Part labels are the indices of
    `parts` in synthetic.json (value j + 1 in a part PNG is part j); a pixel's label is its part, at
    224 x 224 by nearest-neighbour resizing. A pair's ground truth in an image is the union of its
    differing parts' pixels.
    """

    def __init__(self, split: WSOLSplit, manifest: str | Path | None = None,
                 groups: Sequence[int] = EVALUATED_GROUPS):
        if split.parts is None:
            raise MetadataError(f"{split.metadata_dir}: no parts.txt; cue localization needs part masks")
        path = Path(manifest) if manifest is not None else split.metadata_dir.parent / "synthetic.json"
        classes, self.part_names = _read_manifest(path)
        if len(classes) != split.num_classes:
            raise MetadataError(f"{path}: describes {len(classes)} classes, the split has {split.num_classes}")
        slots = {slot for combo in classes for slot in combo}
        missing = sorted(slot for slot in slots if slot not in self.part_names)
        if missing:
            raise MetadataError(f"{path}: class slot(s) {missing} are not among the parts {self.part_names}")
        differing = np.zeros((len(classes), len(classes)), np.int64)
        for i, a in enumerate(classes):
            for j, b in enumerate(classes):
                for slot in slots:
                    if a.get(slot) != b.get(slot):
                        differing[i, j] |= 1 << self.part_names.index(slot)
        self.split = split
        self.pairs = build_pairs(differing, self.part_names, groups)
        self.description = f"synthetic ({path.name}): differing part slots, exact part masks"
        self.checks: list[str] = []

    def label_maps(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.empty((len(indices), CUE_SIZE, CUE_SIZE), np.uint8)
        visible = np.zeros(len(indices), np.int64)
        for row, index in enumerate(np.asarray(indices).tolist()):
            parts = self.split.parts[index]
            if list(parts.names) != self.part_names:
                raise MetadataError(f"{self.split.metadata_dir / 'parts.txt'}: parts of "
                                    f"{self.split.image_ids[index]!r} are {parts.names}, expected {self.part_names}")
            labels[row] = _part_label_map(parts.mask_path, len(self.part_names))
            visible[row] = visible_bits(labels[row])
        return labels, visible


def _part_label_map(path: Path, num_parts: int) -> np.ndarray:
    values = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if values is None:
        raise MetadataError(f"{path}: part mask missing or unreadable")
    if int(values.max()) > num_parts:
        raise MetadataError(f"{path}: part value {int(values.max())} but only {num_parts} parts (values 0..{num_parts})")
    rows, cols = nearest_rows_cols(*values.shape)
    resized = values[np.ix_(rows, cols)]
    return np.where(resized == 0, NO_PART, resized - 1).astype(np.uint8)


def _read_manifest(path: Path) -> tuple[list[dict[str, int]], list[str]]:
    """(each class's variant per slot, the part names) from a synthetic dataset's synthetic.json."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MetadataError(f"{path}: missing (written by `calm-fast synth` beside the split folders)") from None
    except (OSError, ValueError) as error:
        raise MetadataError(f"{path}: not readable JSON ({error})") from None
    try:
        parts = [str(name) for name in manifest["parts"]]
        classes = [{slot: int(spec["variant"]) for slot, spec in combo.items()} for combo in manifest["classes"]]
    except (KeyError, TypeError, ValueError) as error:
        raise MetadataError(f"{path}: expected 'parts' and 'classes' (slot -> {{'variant': n}}), got {error!r}") from None
    if not classes or not parts:
        raise MetadataError(f"{path}: no classes or no parts")
    return classes, parts
