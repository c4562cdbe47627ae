"""Reader of the WSOL metadata layout (CUB, ILSVRC, OpenImages and calm-fast's synthetic sets).

Layout (see the data specification): ``<metadata_root>/<dataset>/<split>/`` holds

==========================  ==================================================================
``image_ids.txt``            one image path per line, relative to the split's image root (the key)
``class_labels.txt``         ``path,label`` with 0-based integer labels
``image_sizes.txt``          ``path,width,height``; may be missing or empty (OpenImages): sizes are
                             then read from the image headers on first use of ``image_sizes``
``localization.txt``         boxes ``path,x0,y0,x1,y1`` (original pixels, inclusive ends, one line per
                             box) or masks ``path,mask_path,ignore_path`` (one line per instance,
                             only an image's first line carries the ignore path)
``localization_masks.txt``   masks in the second form, for sets that have both boxes and masks
                             (calm-fast's synthetic sets)
``parts.txt``                part annotations of the synthetic sets (format in the README, "The synthetic dataset")
==========================  ==================================================================

Every problem is reported as a :class:`MetadataError` naming the file and the line. Every path in these
files (image ids, mask and part-mask paths) must stay inside its root: a relative path without ``..``
components (symlinks inside the root are followed: they are the dataset owner's choice). The labels are
bounded by the class count the caller gives, else the one the dataset declares (``synthetic.json`` of
calm-fast's synthetic sets), else (library use only) the largest label + 1. The only repair is the one
real datasets need: a box that extends one pixel past the image is clipped to the image, and counted in
``WSOLSplit.repairs["box_clipped_1px"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calm_fast.errors import UserError

__all__ = [
    "MetadataError",
    "MaskEntry",
    "ImageParts",
    "WSOLSplit",
    "read_split",
    "default_image_root",
    "default_metadata_root",
    "read_image_size",
    "declared_num_classes",
]

SPLITS = ("train", "val", "test")

# Each split's image root relative to the data root (DATA.md): the reference scripts disagree about the
# val roots, so these are only defaults and every caller may pass its own root.
_IMAGE_ROOTS = {
    "CUB": {"train": "CUB/images", "val": "CUBV2", "test": "CUB/images"},
    "ILSVRC": {"train": "ILSVRC", "val": "ImageNetV2", "test": "ILSVRC"},
    "OpenImages": {"train": "OpenImages", "val": "OpenImages", "test": "OpenImages"},
}


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


@dataclass(frozen=True, eq=False)
class WSOLSplit:
    """One split of a WSOL dataset, fully validated.

    ``image_sizes`` is ``(width, height)`` per image; when the split has no ``image_sizes.txt`` (or an
    empty one) the sizes are read from the image headers the first time ``image_sizes`` is used.
    ``boxes[i]`` is an ``[k, 4]`` array of ``x0, y0, x1, y1`` (int64 unless the file held fractional
    coordinates), ``masks[i]`` the image's :class:`MaskEntry`; either is None when the split has none.
    ``repairs`` counts every repair made while reading (see the module docstring).
    """

    dataset: str
    split: str
    image_root: Path
    image_ids: list[str]
    labels: np.ndarray
    boxes: list[np.ndarray] | None
    masks: list[MaskEntry] | None
    parts: list[ImageParts] | None
    num_classes: int
    metadata_dir: Path
    repairs: dict[str, int] = dataclasses.field(default_factory=dict)
    # Sizes known when the split was read (image_sizes.txt, or headers read to check boxes); None: the
    # image_sizes property reads the headers on first use.
    known_sizes: np.ndarray | None = dataclasses.field(default=None, repr=False)
    # The image_sizes.txt line of each image (1-based), when the sizes came from that file.
    size_lines: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, i: int) -> Path:
        """Path of image ``i`` (``image_root / image_ids[i]``)."""
        return self.image_root / self.image_ids[i]

    def check_image_size(self, i: int, size: tuple[int, int]) -> None:
        """Image ``i`` decoded as ``size`` (width, height): a MetadataError naming the file and the line if
        image_sizes.txt says otherwise, since its boxes (given in the listed frame) would be misplaced.
        Every reader of image files (the torch loader, ``calm-fast convert``) calls it."""
        if self.size_lines is None:
            return  # sizes from the image headers: the decoded size by construction
        expected = (int(self.known_sizes[i][0]), int(self.known_sizes[i][1]))
        if tuple(size) != expected:
            raise MetadataError(
                f"{self.image_path(i)}: image is {size[0]}x{size[1]} but "
                f"{self.metadata_dir / 'image_sizes.txt'}:{int(self.size_lines[i])} says "
                f"{expected[0]}x{expected[1]}: its boxes would be misplaced"
            )

    @functools.cached_property
    def image_sizes(self) -> np.ndarray:
        """int64 ``[N, 2]`` (width, height), from ``image_sizes.txt`` or else from the image headers."""
        if self.known_sizes is not None:
            return self.known_sizes
        sizes = np.empty((len(self), 2), dtype=np.int64)
        for i in range(len(self)):
            sizes[i] = read_image_size(self.image_path(i))
        return sizes


def default_metadata_root(data_root: str | Path) -> Path:
    """``<data_root>/metadata``."""
    return Path(data_root) / "metadata"


def default_image_root(data_root: str | Path, dataset: str, split: str) -> Path:
    """The default image root of a split (DATA.md); other datasets (synthetic) use ``<data_root>/<dataset>``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    relative = _IMAGE_ROOTS.get(dataset, {}).get(split, dataset)
    return Path(data_root) / relative


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header alone (no decoding), in stored-pixel orientation.

    EXIF orientation is not applied: boxes of the WSOL datasets are in the stored frame, as is the
    reference loader's view of the image.
    """
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise MetadataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as error:
        raise MetadataError(f"{path}: cannot read image header ({error})") from None


# ----------------------------------------------------------------------------------------------------
# Line-level parsing. Every function takes the file and the 1-based line number only to name them.


def _read_lines(path: Path, required: bool = True) -> list[str] | None:
    """Lines of a text file without line ends; None when an optional file is missing."""
    if not path.is_file():
        if required:
            raise MetadataError(f"{path}: required metadata file is missing")
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the first path
    except UnicodeDecodeError as error:
        decoded = error.object  # the bytes after a byte-order mark: error.start counts from there
        line_no = decoded.count(b"\n", 0, error.start) + 1
        column = error.start - (decoded.rfind(b"\n", 0, error.start) + 1) + 1
        raise MetadataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{decoded[error.start]:02x} at column "
                            f"{column}: {error.reason})") from None
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


class _IdIndex:
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


def _read_labels(path: Path, ids: _IdIndex, num_classes: int | None, proxy: bool) -> np.ndarray:
    labels = np.full(len(ids.ids), -1, dtype=np.int64)
    seen = np.zeros(len(ids.ids), dtype=bool)
    first_line = {}
    for line_no, line in enumerate(_read_lines(path), 1):
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


def _read_sizes(path: Path, ids: _IdIndex, proxy: bool) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """(sizes [N, 2], the line of each) or (None, None) when the file is missing or empty."""
    lines = _read_lines(path, required=False)
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


def _localization_kind(path: Path, lines: list[str]) -> str:
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


def _read_boxes(path: Path, lines: list[str], ids: _IdIndex, sizes_of, proxy: bool, repairs: dict) -> list[np.ndarray]:
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


def _read_masks(path: Path, lines: list[str], ids: _IdIndex, mask_root: Path, proxy: bool) -> list[MaskEntry]:
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


def _read_parts(path: Path, ids: _IdIndex, image_root: Path, proxy: bool) -> list[ImageParts]:
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
    for line_no, line in enumerate(_read_lines(path), 1):
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


def declared_num_classes(metadata_root: str | Path, dataset: str) -> int | None:
    """The class count a dataset declares (``<metadata_root>/<dataset>/synthetic.json``), or None."""
    path = Path(metadata_root) / dataset / "synthetic.json"
    if not path.is_file():
        return None
    try:
        count = json.loads(path.read_text(encoding="utf-8"))["options"]["num_classes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise MetadataError(f"{path}: cannot read options.num_classes ({type(error).__name__}: {error})") from None
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise MetadataError(f"{path}: options.num_classes must be a positive integer, got {count!r}")
    return count


def _check_files_exist(split: WSOLSplit) -> None:
    """check_images=True: every image opens and decodes; every mask file exists."""
    for i in range(len(split)):
        path = split.image_path(i)
        try:
            with Image.open(path) as image:
                image.load()
        except FileNotFoundError:
            raise MetadataError(f"{path}: image {split.image_ids[i]!r} of {split.metadata_dir} is missing") from None
        except Exception as error:  # PIL raises several types for broken files
            raise MetadataError(f"{path}: unreadable image ({type(error).__name__}: {error})") from None
    for entry in split.masks or []:
        for mask_path in entry.paths + ([entry.ignore_path] if entry.ignore_path else []):
            if not mask_path.is_file():
                raise MetadataError(f"{mask_path}: mask file is missing")
    for parts in split.parts or []:
        if not parts.mask_path.is_file():
            raise MetadataError(f"{parts.mask_path}: part mask file is missing")


def read_split(
    metadata_root: str | Path,
    dataset: str,
    split: str,
    image_root: str | Path,
    mask_root: str | Path | None = None,
    num_classes: int | None = None,
    check_images: bool = False,
    proxy: bool = False,
) -> WSOLSplit:
    """Read and validate ``<metadata_root>/<dataset>/<split>/``.

    ``mask_root`` is the folder that mask paths are relative to (default: the image root, as for
    OpenImages, whose masks lie beside the images). ``num_classes`` bounds the labels (default: the
    count the dataset declares, see :func:`declared_num_classes`, else the largest label + 1). ``check_images`` opens and decodes every image and checks that mask files
    exist (slow on big sets). ``proxy`` reads ``image_ids_proxy.txt`` (ILSVRC's training subset)
    instead of ``image_ids.txt``; lines of the other files for images outside it are then skipped.
    Raises :class:`MetadataError` naming the file and line of the first problem.
    """
    folder = Path(metadata_root) / dataset / split
    if not folder.is_dir():
        raise MetadataError(f"{folder}: metadata folder not found (expected <metadata_root>/<dataset>/<split>)")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes is None:
        num_classes = declared_num_classes(metadata_root, dataset)
    image_root = Path(image_root)
    mask_root = Path(mask_root) if mask_root is not None else image_root

    ids_path = folder / ("image_ids_proxy.txt" if proxy else "image_ids.txt")
    ids = _IdIndex(ids_path, _read_lines(ids_path))
    if not ids.ids:
        raise MetadataError(f"{ids_path}: no image listed")
    labels = _read_labels(folder / "class_labels.txt", ids, num_classes, proxy)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    sizes, size_lines = _read_sizes(folder / "image_sizes.txt", ids, proxy)

    repairs: dict[str, int] = {}
    boxes = masks = None
    localization = _read_lines(folder / "localization.txt", required=False)
    mask_lines = _read_lines(folder / "localization_masks.txt", required=False)
    header_sizes: list[np.ndarray] = []

    def sizes_of() -> np.ndarray:
        if sizes is not None:
            return sizes
        if not header_sizes:  # boxes without image_sizes.txt: check them against the real images
            header_sizes.append(np.array([read_image_size(image_root / i) for i in ids.ids], dtype=np.int64))
        return header_sizes[0]

    if localization:
        kind = _localization_kind(folder / "localization.txt", localization)
        if kind == "boxes":
            boxes = _read_boxes(folder / "localization.txt", localization, ids, sizes_of, proxy, repairs)
        else:
            masks = _read_masks(folder / "localization.txt", localization, ids, mask_root, proxy)
    if mask_lines:
        if masks is not None:
            raise MetadataError(f"{folder}: masks given in both localization.txt and localization_masks.txt")
        if _localization_kind(folder / "localization_masks.txt", mask_lines) != "masks":
            raise MetadataError(f"{folder / 'localization_masks.txt'}:1: expected 'path,mask_path,ignore_path'")
        masks = _read_masks(folder / "localization_masks.txt", mask_lines, ids, mask_root, proxy)
    parts = None
    if (folder / "parts.txt").is_file():
        parts = _read_parts(folder / "parts.txt", ids, image_root, proxy)

    result = WSOLSplit(
        dataset=dataset,
        split=split,
        image_root=image_root,
        image_ids=ids.ids,
        labels=labels,
        boxes=boxes,
        masks=masks,
        parts=parts,
        num_classes=num_classes,
        metadata_dir=folder,
        repairs=repairs,
        known_sizes=sizes if sizes is not None else (header_sizes[0] if header_sizes else None),
        size_lines=size_lines,
    )
    if check_images:
        _check_files_exist(result)
    return result
