"""CUB-200-2011 cue-localization ground truth, as CALM.md §4 defines it (the reference protocol).

Reads the full CUB distribution's extras (`images.txt`, `parts/parts.txt`, `parts/part_locs.txt`,
`attributes/attributes.txt`, `attributes/class_attribute_labels_continuous.txt`, `segmentations/*.png`).
A class has an attribute when its continuous label is >= 50. An attribute belongs to every part group
whose keyword is a substring of its whole "category::value" name (so `has_shape::long-legged-like` is a
leg attribute, and upperparts, underparts, primary colour, size and other shapes match no group). Two
classes differ in the groups of the attributes one has and the other lacks; pairs differing in 1, 2 or 3
groups are evaluated (published counts 31 / 64 / 96: `check_pair_counts`). An image's pseudo mask: its
visible keypoints scaled to 224 x 224 (x / width * 224, then truncated to integers; the head keypoints
averaged to one point first; left and right legs and wings kept apart), every pixel labelled with the group
of its nearest keypoint (ties: the first in the order head, back, belly, breast, tail, legs, wings), kept
only where the segmentation, resized bicubically by PIL, is > 0. Images without a visible keypoint of a
pair's differing groups are skipped for that pair. Not run on the real dataset here (it cannot be
downloaded on this machine): the pair counts are the printed check for a user who has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calm_fast.data.cue_truth import CUE_SIZE, EVALUATED_GROUPS, NO_PART, CuePairs, build_pairs
from calm_fast.data.metadata import WSOLSplit
from calm_fast.data.metadata_files import MetadataError
from calm_fast.errors import not_utf8_message

PART_GROUPS = ("head", "back", "belly", "breast", "tail", "leg", "wing")  # label l = PART_GROUPS[l]
GROUP_KEYWORDS = {
    "head": ("bill", "crown", "eye", "forehead", "head", "nape", "throat"),
    "back": ("back",), "belly": ("belly",), "breast": ("breast",), "tail": ("tail",), "leg": ("leg",),
    "wing": ("wing",),
}
# The 15 keypoints of parts/parts.txt and their groups; head keypoints are averaged into one point.
KEYPOINT_GROUPS = {
    "back": "back", "beak": "head", "belly": "belly", "breast": "breast", "crown": "head", "forehead": "head",
    "left eye": "head", "left leg": "leg", "left wing": "wing", "nape": "head", "right eye": "head",
    "right leg": "leg", "right wing": "wing", "tail": "tail", "throat": "head",
}
PRESENT_FROM = 50.0  # class_attribute_labels_continuous.txt: a class has an attribute from 50 (percent) on
PUBLISHED_PAIR_COUNTS = {1: 31, 2: 64, 3: 96}


def attribute_groups(name: str) -> int:
    """Bit mask of the part groups whose keyword is a substring of the whole attribute name."""
    bits = 0
    for label, group in enumerate(PART_GROUPS):
        if any(keyword in name for keyword in GROUP_KEYWORDS[group]):
            bits |= 1 << label
    return bits


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise MetadataError(f"{path}: required CUB file is missing")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise MetadataError(not_utf8_message(path, error)) from None
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _numbered(path: Path) -> list[str]:
    """Files of '<id> <text>' lines with ids 1, 2, ... in order: the texts."""
    texts = []
    for line_no, line in enumerate(_lines(path), 1):
        number, _, text = line.strip().partition(" ")
        if number != str(line_no) or not text.strip():
            raise MetadataError(f"{path}:{line_no}: expected '{line_no} <name>', got {line.strip()!r}")
        texts.append(text.strip())
    return texts


def read_attribute_names(cub_root: Path) -> list[str]:
    """attributes/attributes.txt (the CUB tarball also puts it beside CUB_200_2011/): the names in id order."""
    candidates = [cub_root / "attributes" / "attributes.txt", cub_root / "attributes.txt",
                  cub_root.parent / "attributes.txt"]
    for path in candidates:
        if path.is_file():
            return _numbered(path)
    raise MetadataError(f"attributes.txt not found; looked at {', '.join(str(p) for p in candidates)}")


def read_class_attributes(path: Path, num_attributes: int) -> np.ndarray:
    """class_attribute_labels_continuous.txt: float64 [classes, attributes], one class per line."""
    rows = []
    for line_no, line in enumerate(_lines(path), 1):
        tokens = line.split()
        if len(tokens) != num_attributes:
            raise MetadataError(f"{path}:{line_no}: expected {num_attributes} values (one per attribute), "
                                f"got {len(tokens)}")
        try:
            values = [float(token) for token in tokens]
        except ValueError:
            raise MetadataError(f"{path}:{line_no}: a value is not a number") from None
        if not all(0.0 <= v <= 100.0 for v in values):
            raise MetadataError(f"{path}:{line_no}: values must be percentages in [0, 100]")
        rows.append(values)
    if not rows:
        raise MetadataError(f"{path}: no class listed")
    return np.array(rows, np.float64)


def cub_pairs(cub_root: str | Path, groups: Sequence[int] = EVALUATED_GROUPS) -> CuePairs:
    """The class pairs and their differing part groups from the attribute files."""
    cub_root = Path(cub_root)
    names = read_attribute_names(cub_root)
    present = read_class_attributes(cub_root / "attributes" / "class_attribute_labels_continuous.txt",
                                    len(names)) >= PRESENT_FROM
    attribute_bits = np.array([attribute_groups(name) for name in names], np.int64)
    differs = present[:, None, :] != present[None, :, :]  # [K, K, A]
    differing = np.zeros(differs.shape[:2], np.int64)
    for bit in range(len(PART_GROUPS)):  # a group differs when any of its attributes does
        in_group = (attribute_bits >> bit & 1).astype(bool)
        differing |= differs[:, :, in_group].any(axis=2).astype(np.int64) << bit
    return build_pairs(differing, PART_GROUPS, groups)


def check_pair_counts(pairs: CuePairs) -> tuple[bool, str]:
    """(whether the pair counts per group equal the published 31 / 64 / 96, a line saying so)."""
    found = {g: pairs.group_counts.get(g, 0) for g in PUBLISHED_PAIR_COUNTS}
    ok = found == PUBLISHED_PAIR_COUNTS
    shown = " / ".join(str(found[g]) for g in sorted(found))
    verdict = "match the published 31 / 64 / 96" if ok else "DIFFER from the published 31 / 64 / 96"
    return ok, f"CUB cue pairs with 1 / 2 / 3 differing part groups: {shown}: {verdict}"


def read_part_names(path: Path) -> list[str]:
    """parts/parts.txt; every name must be one of CUB's 15 keypoints."""
    names = _numbered(path)
    for line_no, name in enumerate(names, 1):
        if name not in KEYPOINT_GROUPS:
            raise MetadataError(f"{path}:{line_no}: unknown part {name!r}; expected one of {sorted(KEYPOINT_GROUPS)}")
    return names


def read_part_locations(path: Path, num_parts: int) -> dict[int, np.ndarray]:
    """parts/part_locs.txt: image id -> float64 [num_parts, 3] (x, y, visible); missing parts invisible."""
    locations: dict[int, np.ndarray] = {}
    first_line: dict[tuple[int, int], int] = {}
    for line_no, line in enumerate(_lines(path), 1):
        tokens = line.split()
        try:
            image_id, part_id, visible = int(tokens[0]), int(tokens[1]), int(tokens[4])
            x, y = float(tokens[2]), float(tokens[3])
        except (IndexError, ValueError):
            raise MetadataError(f"{path}:{line_no}: expected '<image_id> <part_id> <x> <y> <visible>', "
                                f"got {line.strip()!r}") from None
        if len(tokens) != 5 or not 1 <= part_id <= num_parts or visible not in (0, 1):
            raise MetadataError(f"{path}:{line_no}: expected part id in 1..{num_parts} and visible 0 or 1, "
                                f"got {line.strip()!r}")
        if (image_id, part_id) in first_line:
            raise MetadataError(f"{path}:{line_no}: second location of part {part_id} in image {image_id} "
                                f"(first on line {first_line[image_id, part_id]})")
        first_line[image_id, part_id] = line_no
        locations.setdefault(image_id, np.zeros((num_parts, 3), np.float64))[part_id - 1] = (x, y, visible)
    return locations


def keypoints_224(locations: np.ndarray, part_names: Sequence[str], width: int, height: int):
    """(points int64 [n, 2] (x, y) in the 224 frame, labels int64 [n]) of an image's visible keypoints.

    Coordinates are x / width * 224 (then y likewise), the head keypoints averaged, then truncated to
    integers; points come in the order head, back, belly, breast, tail, legs, wings (parts.txt order
    within a group), which decides ties between equally near keypoints.
    """
    scaled = locations[:, :2] / np.array([width, height], np.float64) * CUE_SIZE
    visible = locations[:, 2] > 0
    points, labels = [], []
    for label, group in enumerate(PART_GROUPS):
        members = [i for i, name in enumerate(part_names) if KEYPOINT_GROUPS[name] == group and visible[i]]
        if not members:
            continue
        if group == "head":
            points.append(scaled[members].mean(axis=0))
            labels.append(label)
        else:
            points.extend(scaled[members])
            labels.extend([label] * len(members))
    if not points:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    return np.array(points).astype(np.int64), np.array(labels, np.int64)


def voronoi_labels(points: np.ndarray, labels: np.ndarray, size: int = CUE_SIZE) -> np.ndarray:
    """uint8 [size, size]: each pixel (x, y) takes the label of its nearest point (squared Euclidean
    distance on integer coordinates; ties go to the first point); NO_PART when there is no point."""
    if len(points) == 0:
        return np.full((size, size), NO_PART, np.uint8)
    grid = np.arange(size, dtype=np.int64)
    dy = (grid[None, :, None] - points[:, 1, None, None]) ** 2
    dx = (grid[None, None, :] - points[:, 0, None, None]) ** 2
    nearest = np.argmin(dy + dx, axis=0)  # the first minimum
    return labels[nearest].astype(np.uint8)


def read_segmentation(path: Path, size: int = CUE_SIZE) -> np.ndarray:
    """bool [size, size]: the segmentation PNG as grayscale, resized with PIL's bicubic filter, > 0."""
    try:
        with Image.open(path) as image:
            resized = image.convert("L").resize((size, size), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise MetadataError(f"{path}: segmentation missing (from CUB's segmentations download)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise MetadataError(f"{path}: unreadable segmentation ({error})") from None
    return np.asarray(resized) > 0


class CubCueTruth:
    """CUB's cue ground truth for the images of a split (metadata image ids are paths under images/).

    `cub_root` holds images.txt, parts/ and attributes/ (the CUB_200_2011 folder); `segmentation_root`
    defaults to `cub_root / "segmentations"`. Label maps are computed per image on demand.
    """

    def __init__(self, cub_root: str | Path, split: WSOLSplit, segmentation_root: str | Path | None = None,
                 groups: Sequence[int] = EVALUATED_GROUPS):
        self.cub_root = Path(cub_root)
        self.segmentation_root = Path(segmentation_root) if segmentation_root else self.cub_root / "segmentations"
        self.split = split
        self.pairs = cub_pairs(self.cub_root, groups)
        if self.pairs.num_classes < split.num_classes:
            raise MetadataError(f"{self.cub_root}: attributes for {self.pairs.num_classes} classes, the split "
                                f"has {split.num_classes}")
        self.part_names = read_part_names(self.cub_root / "parts" / "parts.txt")
        images_txt = self.cub_root / "images.txt"
        id_of = {}
        for line_no, line in enumerate(_lines(images_txt), 1):
            number, _, relative = line.strip().partition(" ")
            if not number.isdigit() or not relative:
                raise MetadataError(f"{images_txt}:{line_no}: expected '<image_id> <path>', got {line.strip()!r}")
            id_of[relative] = int(number)
        missing = [image_id for image_id in split.image_ids if image_id not in id_of]
        if missing:
            raise MetadataError(f"{images_txt}: {len(missing)} image(s) of {split.metadata_dir} are not listed, "
                                f"e.g. {missing[0]!r}")
        self.image_numbers = [id_of[image_id] for image_id in split.image_ids]
        locs_path = self.cub_root / "parts" / "part_locs.txt"
        locations = read_part_locations(locs_path, len(self.part_names))
        absent = [n for n in self.image_numbers if n not in locations]
        if absent:
            raise MetadataError(f"{locs_path}: no part location for image id {absent[0]} "
                                f"({len(absent)} image(s) of {split.metadata_dir})")
        self.locations = [locations[n] for n in self.image_numbers]
        self.description = "CUB-200-2011 (reference protocol): attribute part groups, keypoint Voronoi cells AND segmentation"
        self.checks = [check_pair_counts(self.pairs)[1]]

    def label_maps(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices).tolist()
        labels = np.empty((len(indices), CUE_SIZE, CUE_SIZE), np.uint8)
        visible = np.zeros(len(indices), np.int64)
        sizes = self.split.image_sizes
        for row, index in enumerate(indices):
            width, height = (int(v) for v in sizes[index])
            points, point_labels = keypoints_224(self.locations[index], self.part_names, width, height)
            for label in set(point_labels.tolist()):
                visible[row] |= 1 << label
            segment = read_segmentation(self.segmentation_root / Path(self.split.image_ids[index]).with_suffix(".png"))
            labels[row] = np.where(segment, voronoi_labels(points, point_labels), NO_PART)
        return labels, visible
