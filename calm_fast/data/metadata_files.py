"""Readers of the single files of one WSOL metadata split (the layout is in :mod:`calm_fast.data.metadata`).

Each reader parses one file line by line, ties it to ``image_ids.txt`` (:class:`IdIndex`) and raises a
:class:`MetadataError` naming the file and the line of the first problem. Every path in these files
(image ids, mask and part-mask paths) must stay inside its root: a relative path without ``..``
components (symlinks inside the root are followed: they are the dataset owner's choice). The only repair
is the one real datasets need: a box that extends one pixel past the image is clipped to the image, and
counted in ``repairs["box_clipped_1px"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calm_fast.errors import UserError, not_utf8_message


class MetadataError(UserError, ValueError):
    """A metadata file or an image it names is missing or malformed; the message names file and line."""


@dataclass(frozen=True)
class MaskEntry:
    """The instance masks of one image (absolute paths) and its ignore mask, if any."""

    paths: list[Path]
    ignore_path: Path | None


@dataclass(frozen=True, eq=False)
class ImageParts:
    """The parts of the one annotated object of a synthetic image.

    Part ``j`` (0-based) covers the pixels whose value is ``j + 1`` in the grayscale PNG at
    ``mask_path`` (0 is "no part"); ``boxes[j]`` is the extent of those pixels (inclusive ends, original
    pixels) and ``discriminative[j]`` says whether the part's variant distinguishes the object's class
    from other classes.
    """

    names: list[str]
    boxes: np.ndarray  # int64 [p, 4]
    discriminative: np.ndarray  # bool [p]
    mask_path: Path


# Every function takes the file and the 1-based line number only to name them in its errors.


def read_lines(path: Path, required: bool = True) -> list[str] | None:
    """Lines of a text file without line ends; None when an optional file is missing."""
    if not path.is_file():
        if required:
            raise MetadataError(f"{path}: required metadata file is missing")
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError as error:
        raise MetadataError(not_utf8_message(path, error)) from None
    lines = text.splitlines()
    # A trailing empty line is harmless; an empty line inside the file is an error found by the callers.
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _fields(path: Path, line_no: int, line: str, count: int, what: str) -> list[str]:
    fields = line.strip().split(",")
    if len(fields) != count or not fields[0]:
        raise MetadataError(f"{path}:{line_no}: expected {what}, got {line.strip()!r}")
    return fields


def _integer(path: Path, line_no: int, token: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise MetadataError(f"{path}:{line_no}: {what} is not an integer: {token!r}") from None


def _number(path: Path, line_no: int, token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise MetadataError(f"{path}:{line_no}: {what} is not a number: {token!r}") from None
    if not np.isfinite(value):
        raise MetadataError(f"{path}:{line_no}: {what} is not finite: {token!r}")
    return value


def _inside_root(path: Path, line_no: int, token: str, what: str) -> str:
    """``token`` unchanged if it is a relative path that cannot leave its root (no ``..``, not absolute)."""
    # String tests rather than Path objects: image_ids.txt of ILSVRC has 1.28 M lines.
    if token.startswith("/") or "\x00" in token or (".." in token and ".." in token.split("/")):
        raise MetadataError(f"{path}:{line_no}: {what} {token!r} must be a relative path inside its root "
                            "(no '..', not absolute)")
    return token


class IdIndex:
    """image_ids.txt: the key of every other file, with the checks that tie the files together."""

    def __init__(self, path: Path, lines: list[str]):
        self.path = path
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        for line_no, line in enumerate(lines, 1):
            image_id = line.strip()
            if not image_id:
                raise MetadataError(f"{path}:{line_no}: empty line")
            if "," in image_id:
                raise MetadataError(f"{path}:{line_no}: image path contains a comma: {image_id!r}")
            _inside_root(path, line_no, image_id, "image path")
            if image_id in self.index:
                first = self.index[image_id] + 1
                raise MetadataError(f"{path}:{line_no}: duplicated image id {image_id!r} (first on line {first})")
            self.index[image_id] = len(self.ids)
            self.ids.append(image_id)

    def lookup(self, path: Path, line_no: int, image_id: str, skip_unknown: bool) -> int | None:
        # Files usually list images in the order of image_ids.txt: a string compare is cheaper than hashing.
        if line_no <= len(self.ids) and self.ids[line_no - 1] == image_id:
            return line_no - 1
        i = self.index.get(image_id)
        if i is None and not skip_unknown:
            raise MetadataError(f"{path}:{line_no}: image {image_id!r} is not listed in {self.path}")
        return i

    def require_all(self, seen: np.ndarray, other: Path) -> None:
        """Every image of image_ids.txt must appear in ``other``."""
        missing = np.flatnonzero(~seen)
        if missing.size:
            i = int(missing[0])
            raise MetadataError(
                f"{self.path}:{i + 1}: image {self.ids[i]!r} is listed here but not in {other} "
                f"({missing.size} image(s) missing there)"
            )


def read_labels(path: Path, ids: IdIndex, num_classes: int | None, proxy: bool) -> np.ndarray:
    labels = np.full(len(ids.ids), -1, dtype=np.int64)
    seen = np.zeros(len(ids.ids), dtype=bool)
    first_line = {}
    for line_no, line in enumerate(read_lines(path), 1):
        image_id, token = _fields(path, line_no, line, 2, "'path,label'")
        i = ids.lookup(path, line_no, image_id, skip_unknown=proxy)
        if i is None:
            continue
        if seen[i]:
            raise MetadataError(f"{path}:{line_no}: second label for {image_id!r} (first on line {first_line[i]})")
        label = _integer(path, line_no, token, "label")
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise MetadataError(f"{path}:{line_no}: label {label} of {image_id!r} out of range {bound}")
        labels[i] = label
        seen[i] = True
        first_line[i] = line_no
    ids.require_all(seen, path)
    return labels


def read_sizes(path: Path, ids: IdIndex, proxy: bool) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """(sizes [N, 2], the line of each) or (None, None) when the file is missing or empty."""
    lines = read_lines(path, required=False)
    if not lines:
        return None, None  # read from image headers on demand
    sizes = np.zeros((len(ids.ids), 2), dtype=np.int64)
    line_of = np.zeros(len(ids.ids), dtype=np.int64)
    seen = np.zeros(len(ids.ids), dtype=bool)
    for line_no, line in enumerate(lines, 1):
        image_id, width, height = _fields(path, line_no, line, 3, "'path,width,height'")
        i = ids.lookup(path, line_no, image_id, skip_unknown=proxy)
        if i is None:
            continue
        if seen[i]:
            raise MetadataError(f"{path}:{line_no}: second size for {image_id!r}")
        w = _integer(path, line_no, width, "width")
        h = _integer(path, line_no, height, "height")
        if w <= 0 or h <= 0:
            raise MetadataError(f"{path}:{line_no}: image size {w}x{h} of {image_id!r} is not positive")
        sizes[i] = (w, h)
        line_of[i] = line_no
        seen[i] = True
    ids.require_all(seen, path)
    return sizes, line_of


def localization_kind(path: Path, lines: list[str]) -> str:
    """'boxes' (5 fields) or 'masks' (3 fields), from the first line."""
    if not lines:
        raise MetadataError(f"{path}: file is empty")
    count = len(lines[0].split(","))
    if count == 5:
        return "boxes"
    if count == 3:
        return "masks"
    raise MetadataError(
        f"{path}:1: expected boxes 'path,x0,y0,x1,y1' or masks 'path,mask_path,ignore_path', got {lines[0]!r}"
    )


def read_boxes(path: Path, lines: list[str], ids: IdIndex, sizes_of, proxy: bool, repairs: dict) -> list[np.ndarray]:
    """Boxes per image; ``sizes_of()`` gives the image sizes (maybe read from headers) for the bounds check."""
    per_image: list[list[list[float]]] = [[] for _ in ids.ids]
    line_of_box: list[list[int]] = [[] for _ in ids.ids]
    for line_no, line in enumerate(lines, 1):
        image_id, *tokens = _fields(path, line_no, line, 5, "'path,x0,y0,x1,y1'")
        i = ids.lookup(path, line_no, image_id, skip_unknown=proxy)
        if i is None:
            continue
        x0, y0, x1, y1 = (_number(path, line_no, t, name) for t, name in zip(tokens, ("x0", "y0", "x1", "y1")))
        if x1 < x0 or y1 < y0:
            raise MetadataError(f"{path}:{line_no}: box of {image_id!r} has x1<x0 or y1<y0: {tokens}")
        per_image[i].append([x0, y0, x1, y1])
        line_of_box[i].append(line_no)
    ids.require_all(np.array([bool(b) for b in per_image], dtype=bool), path)

    all_values = np.array([v for boxes in per_image for box in boxes for v in box])
    integral = bool(np.all(all_values == np.round(all_values)))
    dtype = np.int64 if integral else np.float64
    sizes = sizes_of()
    clipped = 0
    result = []
    for i, boxes in enumerate(per_image):
        array = np.array(boxes, dtype=np.float64)
        width, height = sizes[i]
        low, high = np.array([0, 0, 0, 0]), np.array([width - 1, height - 1, width - 1, height - 1])
        outside = (array < low) | (array > high)
        if outside.any():
            # One pixel past the border is a known annotation habit: clip it and count the repair.
            if (array < low - 1).any() or (array > high + 1).any():
                row = int(np.flatnonzero(outside.any(axis=1))[0])
                raise MetadataError(
                    f"{path}:{line_of_box[i][row]}: box {boxes[row]} of {ids.ids[i]!r} lies outside the "
                    f"{width}x{height} image by more than one pixel"
                )
            clipped += int(outside.any(axis=1).sum())
            array = np.clip(array, low, high)
        result.append(array.astype(dtype))
    if clipped:
        repairs["box_clipped_1px"] = repairs.get("box_clipped_1px", 0) + clipped
    return result


def read_masks(path: Path, lines: list[str], ids: IdIndex, mask_root: Path, proxy: bool) -> list[MaskEntry]:
    mask_paths: list[list[Path]] = [[] for _ in ids.ids]
    ignore: list[Path | None] = [None] * len(ids.ids)
    for line_no, line in enumerate(lines, 1):
        image_id, mask_path, ignore_path = _fields(path, line_no, line, 3, "'path,mask_path,ignore_path'")
        i = ids.lookup(path, line_no, image_id, skip_unknown=proxy)
        if i is None:
            continue
        if not mask_path:
            raise MetadataError(f"{path}:{line_no}: empty mask path for {image_id!r}")
        _inside_root(path, line_no, mask_path, "mask path")
        if ignore_path:
            _inside_root(path, line_no, ignore_path, "ignore path")
        first_of_image = not mask_paths[i]
        if ignore_path and not first_of_image and ignore[i] != mask_root / ignore_path:
            raise MetadataError(
                f"{path}:{line_no}: ignore path of {image_id!r} given on a later line and different from "
                f"the first line's (only the first line of an image carries it)"
            )
        if first_of_image and ignore_path:
            ignore[i] = mask_root / ignore_path
        mask_paths[i].append(mask_root / mask_path)
    ids.require_all(np.array([bool(m) for m in mask_paths], dtype=bool), path)
    return [MaskEntry(paths, ignore_path) for paths, ignore_path in zip(mask_paths, ignore)]


def read_parts(path: Path, ids: IdIndex, image_root: Path, proxy: bool) -> list[ImageParts]:
    """parts.txt: ``path,part_index,name,x0,y0,x1,y1,discriminative,part_mask_path`` (format in the README).

    One line per part; an image's part indices run 0, 1, ... in order and its lines share one
    ``part_mask_path`` (relative to the image root), whose pixel value ``part_index + 1`` marks the part.
    ``discriminative`` is 0 or 1. Every image must have at least one part.
    """
    names: list[list[str]] = [[] for _ in ids.ids]
    boxes: list[list[list[int]]] = [[] for _ in ids.ids]
    flags: list[list[bool]] = [[] for _ in ids.ids]
    mask_paths: list[Path | None] = [None] * len(ids.ids)
    expected = "'path,part_index,name,x0,y0,x1,y1,discriminative,part_mask_path'"
    for line_no, line in enumerate(read_lines(path), 1):
        image_id, part_index, name, *coords, flag, mask_path = _fields(path, line_no, line, 9, expected)
        i = ids.lookup(path, line_no, image_id, skip_unknown=proxy)
        if i is None:
            continue
        if _integer(path, line_no, part_index, "part_index") != len(names[i]):
            raise MetadataError(f"{path}:{line_no}: part_index {part_index} of {image_id!r}, expected {len(names[i])}")
        box = [_integer(path, line_no, c, n) for c, n in zip(coords, ("x0", "y0", "x1", "y1"))]
        if box[2] < box[0] or box[3] < box[1]:
            raise MetadataError(f"{path}:{line_no}: part box of {image_id!r} has x1<x0 or y1<y0: {coords}")
        if flag not in ("0", "1"):
            raise MetadataError(f"{path}:{line_no}: discriminative must be 0 or 1, got {flag!r}")
        _inside_root(path, line_no, mask_path, "part mask path")
        if mask_paths[i] is not None and mask_paths[i] != image_root / mask_path:
            raise MetadataError(f"{path}:{line_no}: part mask of {image_id!r} differs from its first line's")
        mask_paths[i] = image_root / mask_path
        names[i].append(name)
        boxes[i].append(box)
        flags[i].append(flag == "1")
    ids.require_all(np.array([bool(n) for n in names], dtype=bool), path)
    return [
        ImageParts(names[i], np.array(boxes[i], dtype=np.int64), np.array(flags[i], dtype=bool), mask_paths[i])
        for i in range(len(ids.ids))
    ]
