"""Generate a synthetic WSOL dataset with known boxes, masks and discriminative parts.
`calm-fast synth` renders the scenes of `calm_fast.data.scenes` in parallel from per-image seeds and
writes them atomically, with their metadata, in the WSOL layout.

Each image holds one object built from parts (body, head, tail, crest, legs) on a textured, cluttered
background, plus distractors. Classes differ only in the variant of some parts (head, tail, crest),
each variant having a fixed shape and colour. Bodies wear the background's textures, and distractors
(loose parts, bodies with one part) and clutter repeat the parts' shapes and colours, so neither
"busy" nor "colourful" nor "central" finds the object: only its part configuration does. The output
is the WSOL layout that ``calm_fast.data.metadata.read_split`` reads, both as a box dataset and as a
mask dataset. Design and file formats: README.md, "The synthetic dataset".
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from calm_fast.console import progress_bar
from calm_fast.data.scenes import (
    CLASS_SLOTS,
    PALETTE,
    PART_NAMES,
    VARIANTS,
    SynthOptions,
    class_table,
    discriminative_slots,
    render_scene,
)

__all__ = ["generate", "add_arguments", "main"]

GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "val": 500, "test": 1000}


# ----------------------------------------------------------------------------------------------------
# Writing a dataset


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each image's own random stream: the output does not depend on how images are shared out."""
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def _split_labels(seed: int, split: str, count: int, num_classes: int) -> np.ndarray:
    """Balanced labels (counts differ by at most one), shuffled."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 2**32 - 1])
    return rng.permutation(np.arange(count) % num_classes)


def _encode(ext: str, array: np.ndarray, params: list[int]) -> bytes:
    ok, data = cv2.imencode(ext, array, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {ext} image")
    return data.tobytes()


def _render_chunk(job: tuple) -> list[dict]:
    """Render and write images ``indices`` of a split into ``image_dir``; return their annotations."""
    options, classes, seed, split, indices, labels, image_dir, digits = job
    cv2.setNumThreads(1)
    records = []
    for index, label in zip(indices, labels):
        scene = render_scene(options, classes, int(label), _image_rng(seed, split, index))
        stem = f"{index:0{digits}d}"
        paths = {
            "image": f"{split}/{stem}.jpg",
            "mask": f"masks/{split}/{stem}_object.png",
            "ignore": f"masks/{split}/{stem}_ignore.png",
            "parts": f"parts/{split}/{stem}.png",
        }
        bgr = np.ascontiguousarray(scene.image[..., ::-1])
        files = {
            "image": _encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, options.jpeg_quality]),
            "mask": _encode(".png", scene.object_mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 3]),
            "ignore": _encode(".png", scene.ignore_mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 3]),
            "parts": _encode(".png", scene.part_map, [cv2.IMWRITE_PNG_COMPRESSION, 3]),
        }
        for key, data in files.items():
            (image_dir / paths[key]).write_bytes(data)
        height, width = scene.object_mask.shape
        records.append(
            {
                "paths": paths,
                "label": int(label),
                "size": (width, height),
                "box": scene.box,
                "part_boxes": scene.part_boxes,
                "part_discriminative": scene.part_discriminative,
            }
        )
    return records


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _write_split_metadata(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True)
    ids = [r["paths"]["image"] for r in records]
    _write_text(folder / "image_ids.txt", ids)
    _write_text(folder / "class_labels.txt", [f"{i},{r['label']}" for i, r in zip(ids, records)])
    _write_text(folder / "image_sizes.txt", [f"{i},{r['size'][0]},{r['size'][1]}" for i, r in zip(ids, records)])
    _write_text(folder / "localization.txt", [f"{i},{','.join(map(str, r['box']))}" for i, r in zip(ids, records)])
    _write_text(
        folder / "localization_masks.txt",
        [f"{i},{r['paths']['mask']},{r['paths']['ignore']}" for i, r in zip(ids, records)],
    )
    part_lines = []
    for image_id, r in zip(ids, records):
        for j, name in enumerate(PART_NAMES):
            box = ",".join(map(str, r["part_boxes"][j]))
            flag = int(r["part_discriminative"][j])
            part_lines.append(f"{image_id},{j},{name},{box},{flag},{r['paths']['parts']}")
    _write_text(folder / "parts.txt", part_lines)


def _manifest(name: str, seed: int, options: SynthOptions, classes, sizes: dict[str, int]) -> dict:
    flags = discriminative_slots(classes)
    return {
        "generator": "calm_fast.data.synthetic",
        "version": GENERATOR_VERSION,
        "name": name,
        "seed": seed,
        "sizes": sizes,
        "options": asdict(options),
        "parts": list(PART_NAMES),
        "class_slots": list(CLASS_SLOTS),
        "discriminative_slots": [s for s, f in zip(CLASS_SLOTS, flags) if f],
        "classes": [
            {slot: {"variant": v, "shape": VARIANTS[slot][v][0], "colour": VARIANTS[slot][v][1]}
             for slot, v in zip(CLASS_SLOTS, combo)}
            for combo in classes
        ],
        "palette": PALETTE,
    }


def generate(
    out_root: str | Path,
    name: str = "SYNTH",
    seed: int = 0,
    num_classes: int = 8,
    sizes: dict[str, int] | None = None,
    image_size: int = 128,
    workers: int = 2,
    overwrite: bool = False,
    progress=None,
    **knobs,
) -> dict:
    """Write a synthetic WSOL dataset; return a summary dict.

    Output: ``<out_root>/metadata/<name>/<split>/`` (the WSOL metadata files plus
    ``localization_masks.txt`` and ``parts.txt``), ``<out_root>/metadata/<name>/synthetic.json`` (all
    options and the class definitions) and ``<out_root>/<name>/`` (the image root: JPEG images,
    object/ignore mask PNGs under ``masks/``, part label PNGs under ``parts/``).
    ``sizes`` maps split names to image counts (default train 4000, val 500, test 1000). ``knobs`` are
    the other fields of :class:`SynthOptions` (object_scale, distractors, clutter, ...).
    The same seed and options give byte-identical files, whatever ``workers`` is. Everything is
    written into a hidden temporary folder in ``out_root`` and moved into place at the end (images
    first, metadata last), so an interrupted run leaves no dataset that looks complete.
    ``progress(done, total)`` is called as images are finished, when given.
    """
    options = SynthOptions(num_classes=num_classes, image_size=image_size, **knobs)
    options.validate()
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for split, count in sizes.items():
        if split not in SPLIT_CODES:
            raise ValueError(f"sizes: unknown split {split!r} (expected {tuple(SPLIT_CODES)})")
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"sizes[{split!r}] must be a positive integer, got {count!r}")
    if not name or "/" in name or name.startswith(".") or name == "metadata":
        raise ValueError(f"name: {name!r} is not a valid dataset folder name")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")

    out_root = Path(out_root)
    final_images, final_metadata = out_root / name, out_root / "metadata" / name
    existing = [p for p in (final_images, final_metadata) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists (pass overwrite=True / --overwrite to replace it)")
    out_root.mkdir(parents=True, exist_ok=True)
    staging = out_root / f".{name}.synth-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    classes = class_table(num_classes)
    total = sum(sizes.values())
    start = time.perf_counter()
    try:
        image_dir = staging / name
        jobs = []
        for split, count in sizes.items():
            for sub in (split, f"masks/{split}", f"parts/{split}"):
                (image_dir / sub).mkdir(parents=True)
            labels = _split_labels(seed, split, count, num_classes)
            digits = max(6, len(str(count - 1)))
            chunk = 64
            for lo in range(0, count, chunk):
                indices = list(range(lo, min(lo + chunk, count)))
                jobs.append((options, classes, seed, split, indices, labels[lo : lo + chunk], image_dir, digits))
        records: dict[str, list[dict]] = {split: [] for split in sizes}
        done = 0
        for job, chunk_records in zip(jobs, _run_jobs(jobs, workers)):
            records[job[3]].extend(chunk_records)
            done += len(chunk_records)
            if progress is not None:
                progress(done, total)
        for split, split_records in records.items():
            _write_split_metadata(staging / "metadata" / name / split, split_records)
        manifest = _manifest(name, seed, options, classes, sizes)
        _write_text(staging / "metadata" / name / "synthetic.json", [json.dumps(manifest, indent=2)])
        _move_into_place(staging, name, out_root, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    return {
        "root": str(out_root),
        "name": name,
        "metadata_root": str(out_root / "metadata"),
        "image_root": str(final_images),
        "sizes": sizes,
        "num_classes": num_classes,
        "seconds": seconds,
        "images_per_second": total / seconds if seconds > 0 else float("inf"),
    }


def _run_jobs(jobs: list[tuple], workers: int):
    """Results of _render_chunk per job, in job order; in this process when workers <= 1."""
    if workers <= 1:
        for job in jobs:
            yield _render_chunk(job)
        return
    # spawn: the workers need only numpy and OpenCV, and must not inherit a parent's threads or locks.
    # Unlike multiprocessing.Pool, the executor fails (instead of hanging) when a worker dies.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as executor:
        try:
            yield from executor.map(_render_chunk, jobs)
        except BrokenProcessPool as error:
            raise RuntimeError(
                "a synthetic-data worker process died; if generate() was called from a script, call it "
                "under `if __name__ == '__main__':` (worker processes are spawned and import the script)"
            ) from error


def _move_into_place(staging: Path, name: str, out_root: Path, overwrite: bool) -> None:
    """Images first, metadata last: a dataset without metadata does not look complete to the reader."""
    (out_root / "metadata").mkdir(exist_ok=True)
    moves = [(staging / name, out_root / name), (staging / "metadata" / name, out_root / "metadata" / name)]
    for source, target in moves:
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while generating; not replacing it")
            # Move the old one into the staging folder, which is deleted afterwards.
            os.replace(target, staging / f"old-{target.name}-{uuid.uuid4().hex[:6]}")
        os.replace(source, target)


# ----------------------------------------------------------------------------------------------------
# Command line


def _split_sizes(text: str) -> dict[str, int]:
    """'train=4000,val=500,test=1000' -> dict."""
    sizes = {}
    for item in text.split(","):
        split, _, count = item.partition("=")
        try:
            sizes[split.strip()] = int(count)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected SPLIT=COUNT[,SPLIT=COUNT...], got {item!r}") from None
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthOptions()
    parser.add_argument("--out", default="data", help="data root to write into (default: data)")
    parser.add_argument("--name", default="SYNTH", help="dataset name (default: SYNTH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--sizes", type=_split_sizes, default=dict(DEFAULT_SIZES),
                        help="images per split (default: train=4000,val=500,test=1000)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="nominal image side in pixels; each side varies by --size-jitter")
    parser.add_argument("--size-jitter", type=float, default=defaults.size_jitter)
    parser.add_argument("--object-scale", type=float, nargs=2, default=defaults.object_scale, metavar=("MIN", "MAX"),
                        help="object box side as a fraction of the image side")
    parser.add_argument("--aspect-range", type=float, nargs=2, default=defaults.aspect_range, metavar=("MIN", "MAX"))
    parser.add_argument("--distractors", type=int, default=defaults.distractors,
                        help="at most this many distractors per image (0: none)")
    parser.add_argument("--partial-fraction", type=float, default=defaults.partial_fraction,
                        help="share of distractors that are a body with one part")
    parser.add_argument("--clutter", type=int, default=defaults.clutter, help="at most this many clutter shapes")
    parser.add_argument("--noise", type=int, default=defaults.noise, help="pixel noise amplitude")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--workers", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that name")


def main(args: argparse.Namespace) -> int:
    with progress_bar("rendering", transient=True) as bar:
        task = bar.add_task("rendering", total=sum(args.sizes.values()))
        summary = generate(
            args.out,
            name=args.name,
            seed=args.seed,
            num_classes=args.num_classes,
            sizes=args.sizes,
            image_size=args.image_size,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=lambda done, total: bar.update(task, completed=done),
            size_jitter=args.size_jitter,
            object_scale=tuple(args.object_scale),
            aspect_range=tuple(args.aspect_range),
            distractors=args.distractors,
            partial_fraction=args.partial_fraction,
            clutter=args.clutter,
            noise=args.noise,
            jpeg_quality=args.jpeg_quality,
        )
    counts = ", ".join(f"{split} {count}" for split, count in summary["sizes"].items())
    print(
        f"wrote {summary['name']} ({counts}; {summary['num_classes']} classes) under {summary['root']} "
        f"in {summary['seconds']:.1f} s ({summary['images_per_second']:.0f} images/s)"
    )
    return 0
