"""Convert WSOL dataset splits to FFCV .beton files, one per split, for the fast loaders.

Each sample holds the image, its class label and its index in the split's metadata, so that boxes,
masks, parts and original image sizes stay addressable for evaluation (``WSOLSplit`` by index).

Storage. Images keep their aspect ratio; those larger than --max-resolution (longest side, default
512) are shrunk with PIL's antialiased bilinear filter, as torchvision's Resize does (JPEG files are
first decoded at a reduced DCT scale where that stays above the target). The loaders resize the whole
image to a square when loading (aspect not kept), so one file serves every input size and both
training recipes, and box rescaling needs only the original sizes from the metadata.

Real-data problems (DATA.md), each counted in the summary table and in the JSON sidecar next to the
.beton (``repairs``; the metadata reader's own, such as a box clipped by one pixel, in ``metadata_repairs``):
  grayscale, CMYK, palette, alpha  converted to RGB as PIL's convert("RGB") does (the reference's and
                                   the torch loader's view)
  PNG (or other) named .jpg        decoded by its content
  EXIF orientation                 ignored: boxes are in the stored pixel frame (as in the torch loader)
  larger than --max-resolution     shrunk
  truncated file                   error naming the file; with --allow-truncated PIL fills the missing
                                   part with grey
  missing file, unreadable format, 16-bit or float pixels, size different from image_sizes.txt
                                   error naming the file
The first error stops the conversion (no file is written); so does a worker's death, within a second,
and no worker outlives a killed conversion (``calm_fast.data.ffcv_writer``). Output is atomic: the .beton
is written under a hidden temporary name in the same folder and renamed when complete, then its sidecar
(``<name>.beton.json``: options, metadata fingerprint, counts); a split counts as converted only when
both exist and match its metadata and the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from calm_fast.atomic import write_json
from calm_fast.data.ffcv_writer import WriterStopped, run_writer
from calm_fast.data.images import MAX_STORED_SIDE, ImageProblem, load_for_storage
from calm_fast.data.metadata import (
    SPLITS,
    WSOLSplit,
    default_image_root,
    default_metadata_root,
    read_split,
)
from calm_fast.data.metadata_files import MetadataError
from calm_fast.distributed import usable_cores
from calm_fast.errors import UserError
from calm_fast.modes import WriteMode, choices

__all__ = [
    "ConvertOptions",
    "ConversionError",
    "ConversionSummary",
    "beton_matches",
    "beton_path_for",
    "convert_split",
    "ensure_beton",
    "is_up_to_date",
    "read_beton_info",
    "sidecar_path",
    "add_arguments",
    "main",
]

SIDECAR_FORMAT = 1


class ConversionError(UserError, RuntimeError):
    """A conversion that stopped; no .beton was written. The message names the first bad file."""


@dataclass(frozen=True)
class ConvertOptions:
    """How images are stored. ``write_mode``: "jpg" (JPEG at ``jpeg_quality``), "raw" (uint8 pixels:
    fastest to load, largest), or "proportion" (each image JPEG with probability
    ``compress_probability``, else raw: FFCV's knob to trade file size for decoding time).
    ``max_resolution``: longest stored side (None keeps originals; FFCV's decoder buffers are sized
    by the largest image, so a cap also bounds loader memory). ``allow_truncated``: repair truncated
    files (grey fill) instead of stopping."""

    max_resolution: int | None = 512
    write_mode: str = "jpg"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    allow_truncated: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the option that is out of range."""
        if self.max_resolution is not None and not 16 <= self.max_resolution <= MAX_STORED_SIDE:
            raise ValueError(f"max_resolution must be in [16, {MAX_STORED_SIDE}] or None, got {self.max_resolution}")
        if self.write_mode not in tuple(WriteMode):
            raise ValueError(f"write_mode must be one of {choices(WriteMode)}, got {self.write_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ValueError(f"compress_probability must be in [0, 1], got {self.compress_probability}")


@dataclass
class ConversionSummary:
    """What a conversion wrote; ``repairs`` counts images per kind of repair (module docstring),
    ``metadata_repairs`` the metadata reader's (``WSOLSplit.repairs``)."""

    beton_path: Path
    num_images: int
    seconds: float
    file_bytes: int
    repairs: dict[str, int]
    skipped: bool = False  # ensure_beton found an up-to-date file and wrote nothing
    metadata_repairs: dict[str, int] = dataclasses.field(default_factory=dict)


class _SplitImages:
    """The indexed dataset that FFCV's DatasetWriter reads in its worker processes: (image, label, index).

    A worker must never raise (DatasetWriter would wait forever for its progress): problems and repairs
    are appended as JSON lines to a per-process file in ``report_dir``; a problem also sets ``abort``,
    after which every worker returns placeholders without reading files, so the writer finishes quickly
    and the main process discards its output.
    """

    _PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)

    def __init__(self, split: WSOLSplit, options: ConvertOptions, report_dir: Path, worker_registry: Path, abort):
        self.split = split
        self.paths = [str(split.image_path(i)) for i in range(len(split))]
        self.labels = split.labels
        self.options = options
        self.report_dir = str(report_dir)
        self.worker_registry = str(worker_registry)
        self.abort = abort
        self._registered_pid = None  # each forked worker registers itself once, for the crash watch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self._registered_pid != os.getpid():
            self._registered_pid = os.getpid()
            open(os.path.join(self.worker_registry, str(self._registered_pid)), "w").close()
        label = int(self.labels[i])
        if self.abort.is_set():
            return self._PLACEHOLDER, label, i
        try:
            pixels, repairs, size = load_for_storage(self.paths[i], self.options.max_resolution,
                                                     self.options.allow_truncated)
            self.split.check_image_size(i, size)
        except Exception as error:  # any failure must reach the main process, not kill the worker
            message = str(error) if isinstance(error, (ImageProblem, MetadataError)) else \
                f"{self.paths[i]}: {type(error).__name__}: {error}"
            self._report({"index": int(i), "error": message})
            self.abort.set()
            return self._PLACEHOLDER, label, i
        if repairs:
            self._report({"index": int(i), "repairs": repairs})
        return pixels, label, i

    def _report(self, record: dict) -> None:
        with open(os.path.join(self.report_dir, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def _read_reports(report_dir: Path) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(errors as (index, message) sorted by index, repair counts) from the workers' report files."""
    errors, repairs = [], {}
    for report in sorted(report_dir.glob("*.jsonl")):
        for line in report.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if "error" in record:
                errors.append((record["index"], record["error"]))
            for kind in record.get("repairs", []):
                repairs[kind] = repairs.get(kind, 0) + 1
    return sorted(errors), dict(sorted(repairs.items()))


def _fingerprint(split: WSOLSplit) -> str:
    """Hash of the image ids and labels: a .beton is stale when its split's metadata changed."""
    digest = hashlib.sha256()
    digest.update("\n".join(split.image_ids).encode("utf-8"))
    digest.update(np.ascontiguousarray(split.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _page_size(split: WSOLSplit, options: ConvertOptions) -> int:
    """FFCV page size: a power of two that holds several of the largest samples (a sample never spans pages)."""
    if options.max_resolution is not None:
        largest_side = options.max_resolution
    else:
        largest_side = int(split.image_sizes.max())
    largest_sample = largest_side * largest_side * 3  # a raw image; JPEG is smaller in practice
    return max(1 << 22, 1 << math.ceil(math.log2(4 * largest_sample)))


def beton_path_for(out_dir: str | Path, dataset: str, split: str) -> Path:
    """``<out_dir>/<dataset>_<split>.beton`` (the default out_dir is ``<data_root>/ffcv``)."""
    return Path(out_dir) / f"{dataset}_{split}.beton"


def sidecar_path(beton_path: str | Path) -> Path:
    """The JSON file written next to a finished .beton (``<name>.beton.json``)."""
    beton_path = Path(beton_path)
    return beton_path.with_name(beton_path.name + ".json")


def read_beton_info(beton_path: str | Path) -> dict | None:
    """The sidecar of a converted split (options, fingerprint, counts), or None when it is missing or unreadable."""
    try:
        return json.loads(sidecar_path(beton_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_stale_partials(beton_path: Path) -> None:
    """Remove the temporary files and report folders of this .beton left by conversions that were killed.

    They are named ``.<name>...-<pid>``; those whose process is gone are removed.
    """
    for leftover in beton_path.parent.glob(f".{beton_path.name}*-*"):
        try:
            os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


def convert_split(
    split: WSOLSplit,
    beton_path: str | Path,
    options: ConvertOptions = ConvertOptions(),
    num_workers: int | None = None,
) -> ConversionSummary:
    """Write ``split`` to ``beton_path`` (fields ``image``, ``label``, ``index``) and its JSON sidecar.

    Images are read and repaired by :func:`~calm_fast.data.images.load_for_storage` in ``num_workers``
    processes (default: the usable cores); FFCV shows a progress bar. Raises :class:`ConversionError`
    naming the first bad file; then, as after an interruption, no .beton is left at ``beton_path``.
    """
    # FFCV is imported on use: it takes seconds to import, and calm-fast runs without it (torch loader).
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    options.validate()
    num_workers = usable_cores() if num_workers is None else int(num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    beton_path = Path(beton_path)
    if beton_path.suffix != ".beton":
        raise ValueError(f"beton_path must end in .beton, got {beton_path}")
    beton_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(beton_path)
    partial = beton_path.with_name(f".{beton_path.name}.partial-{os.getpid()}")
    report_dir = beton_path.with_name(f".{beton_path.name}.reports-{os.getpid()}")
    shutil.rmtree(report_dir, ignore_errors=True)
    report_dir.mkdir()
    abort = multiprocessing.get_context().Event()
    fields = {
        "image": RGBImageField(write_mode=options.write_mode, max_resolution=None,
                               jpeg_quality=options.jpeg_quality,
                               compress_probability=options.compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    worker_registry = report_dir / "workers"
    worker_registry.mkdir()
    source = _SplitImages(split, options, report_dir, worker_registry, abort)
    writer = DatasetWriter(str(partial), fields, page_size=_page_size(split, options), num_workers=num_workers)
    # Chunks small enough that every worker gets several, large enough to keep the queue short.
    chunk_size = max(1, min(100, len(split) // (4 * num_workers)))
    where = f"{split.dataset}/{split.split} ({split.metadata_dir})"
    start = time.perf_counter()
    try:
        try:
            run_writer(writer, source, chunk_size, worker_registry, report_dir / "stopped.txt")
        except WriterStopped as stop:
            raise ConversionError(f"converting {where} stopped: {stop}") from None
        seconds = time.perf_counter() - start
        errors, repairs = _read_reports(report_dir)
        if errors:  # the workers wrote placeholders from the first bad image on; the file is discarded
            index, message = errors[0]
            more = f"; {len(errors) - 1} more bad image(s) met before stopping" if len(errors) > 1 else ""
            raise ConversionError(f"{message} [sample {index} of {where}{more}]")
        # An older sidecar must never describe the new file, even if we are killed right after the rename.
        sidecar_path(beton_path).unlink(missing_ok=True)
        os.replace(partial, beton_path)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(report_dir, ignore_errors=True)
    info = {
        "format": SIDECAR_FORMAT,
        "dataset": split.dataset,
        "split": split.split,
        "num_images": len(split),
        "num_classes": split.num_classes,
        "fingerprint": _fingerprint(split),
        "options": dataclasses.asdict(options),
        "repairs": repairs,
        "metadata_repairs": dict(split.repairs),
        "seconds": round(seconds, 3),
        "fields": ["image", "label", "index"],
    }
    write_json(sidecar_path(beton_path), info)
    return ConversionSummary(beton_path, len(split), seconds, beton_path.stat().st_size, repairs,
                             metadata_repairs=dict(split.repairs))


def _converted_from(info: dict | None, split: WSOLSplit) -> bool:
    """The sidecar `info` was written by this version for the split's current metadata."""
    return info is not None and info.get("format") == SIDECAR_FORMAT and info.get("fingerprint") == _fingerprint(split)


def beton_matches(split: WSOLSplit, beton_path: str | Path) -> bool:
    """True when ``beton_path`` and its sidecar exist and it was converted from the split's current
    metadata, with any storage options (the loaders read them all): the test for loading it."""
    return Path(beton_path).is_file() and _converted_from(read_beton_info(beton_path), split)


def is_up_to_date(split: WSOLSplit, beton_path: str | Path, options: ConvertOptions) -> bool:
    """True when ``beton_path`` matches the split (`beton_matches`) and was stored with ``options``: the
    test for converting it again."""
    info = read_beton_info(beton_path)
    return (Path(beton_path).is_file() and _converted_from(info, split)
            and info.get("options") == dataclasses.asdict(options))


def ensure_beton(
    split: WSOLSplit,
    out_dir: str | Path,
    options: ConvertOptions = ConvertOptions(),
    num_workers: int | None = None,
) -> ConversionSummary:
    """Convert ``split`` into ``beton_path_for(out_dir, ...)`` unless an up-to-date file is already there.

    With several processes, call it on one of them (e.g. local rank 0) and wait for it on the others:
    concurrent conversions of the same split are safe (the last one to finish wins) but wasteful.
    """
    beton_path = beton_path_for(out_dir, split.dataset, split.split)
    _remove_stale_partials(beton_path)  # what a killed conversion left, even when there is nothing to convert
    if is_up_to_date(split, beton_path, options):
        info = read_beton_info(beton_path)
        return ConversionSummary(beton_path, len(split), 0.0, beton_path.stat().st_size,
                                 dict(info.get("repairs", {})), skipped=True, metadata_repairs=dict(split.repairs))
    return convert_split(split, beton_path, options, num_workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default="data",
                        help="folder holding metadata/ and the image roots (default: data)")
    parser.add_argument("--dataset", default="SYNTH", help="dataset name under <metadata-root> (default: SYNTH)")
    parser.add_argument("--split", action="append", choices=SPLITS, dest="splits",
                        help="split to convert; repeat for several (default: every split with metadata)")
    parser.add_argument("--metadata-root", help="default: <data-root>/metadata")
    parser.add_argument("--image-root",
                        help="image root of the split (only with a single --split; default per DATA.md)")
    parser.add_argument("--out-dir", help="where the .beton files go (default: <data-root>/ffcv)")
    parser.add_argument("--max-resolution", type=int, default=512,
                        help="longest stored image side; 0 keeps originals (default: 512)")
    parser.add_argument("--write-mode", choices=tuple(WriteMode), default="jpg",
                        help="jpg, raw pixels, or a random proportion of JPEGs (default: jpg)")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default: 90)")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="share of images stored as JPEG with --write-mode proportion (default: 0.5)")
    parser.add_argument("--allow-truncated", action="store_true",
                        help="fill the missing part of truncated images with grey (counted) instead of stopping")
    parser.add_argument("--workers", type=int, default=None, help="conversion processes (default: usable cores)")
    parser.add_argument("--force", action="store_true", help="convert even when an up-to-date .beton exists")


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    metadata_root = Path(args.metadata_root) if args.metadata_root else default_metadata_root(args.data_root)
    splits = args.splits or [s for s in SPLITS if (metadata_root / args.dataset / s).is_dir()]
    if not splits:
        console.print(f"[red]error:[/red] no split of {args.dataset!r} under {metadata_root}")
        return 2
    if args.image_root and len(splits) != 1:
        console.print("[red]error:[/red] --image-root needs exactly one --split")
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.data_root) / "ffcv"
    try:
        options = ConvertOptions(max_resolution=args.max_resolution or None, write_mode=args.write_mode,
                                 jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                                 allow_truncated=args.allow_truncated)
        options.validate()
        summaries = []
        for split_name in splits:
            image_root = args.image_root or default_image_root(args.data_root, args.dataset, split_name)
            split = read_split(metadata_root, args.dataset, split_name, image_root)
            console.print(f"{args.dataset}/{split_name}: {len(split)} images from {image_root}")
            if args.force:
                summary = convert_split(split, beton_path_for(out_dir, args.dataset, split_name), options, args.workers)
            else:
                summary = ensure_beton(split, out_dir, options, args.workers)
            summaries.append((split_name, summary))
    except (MetadataError, ConversionError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 1

    table = Table(title=f"calm-fast convert: {args.dataset}")
    for column in ("split", "images", "file", "MiB", "seconds", "images/s", "repairs"):
        table.add_column(column)
    for split_name, summary in summaries:
        counted = {**summary.metadata_repairs, **summary.repairs}
        repairs = ", ".join(f"{kind}: {count}" for kind, count in counted.items()) or "none"
        rate = f"{summary.num_images / summary.seconds:.0f}" if summary.seconds > 0 else "-"
        table.add_row(split_name, str(summary.num_images), str(summary.beton_path),
                      f"{summary.file_bytes / 2**20:.1f}",
                      "up to date" if summary.skipped else f"{summary.seconds:.1f}", rate, repairs)
    console.print(table)
    return 0
