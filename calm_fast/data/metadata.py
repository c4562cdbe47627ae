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

Every problem is reported as a :class:`~calm_fast.data.metadata_files.MetadataError` naming the file
and the line; each file's reader, with the rules its lines follow (paths inside their root, the one
repair), is in :mod:`calm_fast.data.metadata_files`. The labels are bounded by the class count the caller
gives, else the one the dataset declares (``synthetic.json`` of calm-fast's synthetic sets), else (library
use only) the largest label + 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from calm_fast.data.metadata_files import (
    IdIndex,
    ImageParts,
    MaskEntry,
    MetadataError,
    localization_kind,
    read_boxes,
    read_labels,
    read_lines,
    read_masks,
    read_parts,
    read_sizes,
)

__all__ = [
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
    ids = IdIndex(ids_path, read_lines(ids_path))
    if not ids.ids:
        raise MetadataError(f"{ids_path}: no image listed")
    labels = read_labels(folder / "class_labels.txt", ids, num_classes, proxy)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    sizes, size_lines = read_sizes(folder / "image_sizes.txt", ids, proxy)

    repairs: dict[str, int] = {}
    boxes = masks = None
    localization = read_lines(folder / "localization.txt", required=False)
    mask_lines = read_lines(folder / "localization_masks.txt", required=False)
    header_sizes: list[np.ndarray] = []

    def sizes_of() -> np.ndarray:
        if sizes is not None:
            return sizes
        if not header_sizes:  # boxes without image_sizes.txt: check them against the real images
            header_sizes.append(np.array([read_image_size(image_root / i) for i in ids.ids], dtype=np.int64))
        return header_sizes[0]

    if localization:
        kind = localization_kind(folder / "localization.txt", localization)
        if kind == "boxes":
            boxes = read_boxes(folder / "localization.txt", localization, ids, sizes_of, proxy, repairs)
        else:
            masks = read_masks(folder / "localization.txt", localization, ids, mask_root, proxy)
    if mask_lines:
        if masks is not None:
            raise MetadataError(f"{folder}: masks given in both localization.txt and localization_masks.txt")
        if localization_kind(folder / "localization_masks.txt", mask_lines) != "masks":
            raise MetadataError(f"{folder / 'localization_masks.txt'}:1: expected 'path,mask_path,ignore_path'")
        masks = read_masks(folder / "localization_masks.txt", mask_lines, ids, mask_root, proxy)
    parts = None
    if (folder / "parts.txt").is_file():
        parts = read_parts(folder / "parts.txt", ids, image_root, proxy)

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
