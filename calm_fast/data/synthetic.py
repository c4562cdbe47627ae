"""Generate a synthetic WSOL dataset with known boxes, masks and discriminative parts.

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
import itertools
import json
import math
import multiprocessing
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "SynthOptions",
    "Scene",
    "class_table",
    "render_scene",
    "generate",
    "add_arguments",
    "main",
]

GENERATOR_VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 4000, "val": 500, "test": 1000}

# RGB. Every colour may appear in backgrounds, clutter and distractors; the part variants below use
# some of them with a fixed shape, so a colour alone never gives the class away.
PALETTE = {
    "red": (214, 39, 40),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 30),
    "green": (44, 160, 44),
    "magenta": (200, 60, 200),
    "cyan": (30, 190, 207),
    "orange": (255, 127, 14),
    "purple": (110, 60, 170),
    "pink": (247, 150, 190),
    "lime": (160, 220, 80),
    "brown": (140, 86, 60),
    "teal": (0, 128, 128),
    "white": (235, 235, 235),
    "grey": (128, 128, 128),
    "dark": (40, 40, 40),
}
COLOUR_NAMES = list(PALETTE)

# Part variants (shape, colour) of the slots that tell classes apart. Within a slot, variants differ
# in both shape and colour (a colour-only cue in random colours stayed unlearnable in calibration).
VARIANTS = {
    "head": [("circle", "red"), ("square", "blue"), ("diamond", "lime"), ("triangle", "pink"),
             ("ring", "brown"), ("star", "teal")],
    "tail": [("triangle", "orange"), ("bar", "purple"), ("circle", "teal"), ("square", "pink"),
             ("diamond", "red"), ("ring", "blue")],
    "crest": [("diamond", "green"), ("star", "yellow"), ("bar", "brown"), ("ring", "lime"),
              ("square", "orange"), ("circle", "purple")],
}
CLASS_SLOTS = tuple(VARIANTS)
# Parts in the order of parts.txt (part index j has value j + 1 in the part mask).
PART_NAMES = ("body", "head", "tail", "crest", "legs")
LEG_COLOUR = "dark"

# Part geometry in the object's frame: u (0 tail end .. 1 head end), v (0 top .. 1 bottom), as
# (centre u, centre v, radius u, radius v). The body is a textured ellipse; the other parts overlap
# its rim so that the object is one connected blob.
BODY = (0.50, 0.56, 0.32, 0.24)
PART_FRAMES = {
    "head": (0.83, 0.30, 0.17, 0.17),
    "tail": (0.15, 0.46, 0.15, 0.15),
    "crest": (0.47, 0.17, 0.15, 0.15),
}
LEG_U = (0.38, 0.62)
LEG_V = (0.70, 1.00)
LEG_HALF_WIDTH = 0.035


@dataclass(frozen=True)
class SynthOptions:
    """The knobs of the generator (all images of a dataset share them)."""

    num_classes: int = 8
    image_size: int = 128
    size_jitter: float = 0.2  # each image side is drawn from image_size * [1 - j, 1 + j]
    object_scale: tuple[float, float] = (0.25, 0.55)  # object side / image side (geometric mean of w and h)
    aspect_range: tuple[float, float] = (2 / 3, 3 / 2)  # object box width / height, log-uniform
    distractors: int = 4  # up to this many distractors per image (uniform 1..n; 0 disables)
    partial_fraction: float = 0.3  # share of distractors that are a body with one part, not a loose part
    clutter: int = 16  # up to this many small clutter shapes (uniform n/2..n)
    noise: int = 6  # uniform pixel noise amplitude
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Raise ValueError naming the argument that is out of range."""
        checks = [
            ("num_classes", 2 <= self.num_classes <= len(VARIANTS["head"]) ** len(CLASS_SLOTS)),
            ("image_size", 32 <= self.image_size <= 4096),
            ("size_jitter", 0 <= self.size_jitter < 0.5),
            ("object_scale", 0.1 <= self.object_scale[0] <= self.object_scale[1] <= 0.9),
            ("aspect_range", 0.25 <= self.aspect_range[0] <= self.aspect_range[1] <= 4),
            ("distractors", 0 <= self.distractors <= 32),
            ("partial_fraction", 0 <= self.partial_fraction <= 1),
            ("clutter", 0 <= self.clutter <= 256),
            ("noise", 0 <= self.noise <= 64),
            ("jpeg_quality", 1 <= self.jpeg_quality <= 100),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"synthetic dataset: {name}={getattr(self, name)!r} is out of range")


def class_table(num_classes: int) -> list[tuple[int, ...]]:
    """The variant index of each class-defining slot (head, tail, crest) for every class.

    With ``v`` variants per slot (the smallest with ``v**3 >= num_classes``), classes are the first
    ``num_classes`` combinations in a fixed shuffled order (independent of the dataset seed), so the
    same ``num_classes`` always means the same classes. For 8 classes every slot has 2 variants and
    every combination is a class: each class differs from three others in exactly one part, from
    three in two parts and from one in all three.
    """
    variants = 2
    while variants ** len(CLASS_SLOTS) < num_classes:
        variants += 1
    if variants > len(VARIANTS["head"]):
        raise ValueError(f"num_classes={num_classes} is more than the part variants can make")
    combos = list(itertools.product(range(variants), repeat=len(CLASS_SLOTS)))
    if len(combos) > num_classes:
        order = np.random.default_rng(20210917).permutation(len(combos))
        combos = [combos[k] for k in sorted(order[:num_classes])]
    return combos


def discriminative_slots(classes: list[tuple[int, ...]]) -> tuple[bool, ...]:
    """A slot is discriminative when the classes use more than one of its variants."""
    return tuple(len({c[s] for c in classes}) > 1 for s in range(len(CLASS_SLOTS)))


# ----------------------------------------------------------------------------------------------------
# Drawing


_SHIFT = 4  # cv2 fixed-point bits: sub-pixel shapes keep small parts faithful
_SCALE = 1 << _SHIFT


def _polygons(shape: str, cx: float, cy: float, rx: float, ry: float) -> list[np.ndarray]:
    """Contours of a shape in float pixel coordinates; two contours make a hole (even-odd fill)."""
    if shape in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        outer = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
        if shape == "circle":
            return [outer]
        inner = np.stack([cx + 0.5 * rx * np.cos(t), cy + 0.5 * ry * np.sin(t)], axis=1)
        return [outer, inner]
    if shape == "square":
        a, b = 0.85 * rx, 0.85 * ry
        return [np.array([[cx - a, cy - b], [cx + a, cy - b], [cx + a, cy + b], [cx - a, cy + b]])]
    if shape == "triangle":
        return [np.array([[cx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]])]
    if shape == "diamond":
        return [np.array([[cx, cy - ry], [cx + rx, cy], [cx, cy + ry], [cx - rx, cy]])]
    if shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [np.stack([cx + rx * radius * np.cos(t), cy + ry * radius * np.sin(t)], axis=1)]
    if shape == "bar":
        a, b = rx, 0.42 * ry
        return [np.array([[cx - a, cy - b], [cx + a, cy - b], [cx + a, cy + b], [cx - a, cy + b]])]
    if shape == "vbar":
        a, b = rx, ry
        return [np.array([[cx - a, cy - b], [cx + a, cy - b], [cx + a, cy + b], [cx - a, cy + b]])]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, cx: float, cy: float, rx: float, ry: float, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    contours = [np.round(p * _SCALE).astype(np.int32) for p in _polygons(shape, cx, cy, rx, ry)]
    cv2.fillPoly(mask, contours, 1, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _two_colours(rng: np.random.Generator, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    a, b = rng.choice(len(names), size=2, replace=False)
    return np.array(PALETTE[names[a]], np.float32), np.array(PALETTE[names[b]], np.float32)


def _texture_colours(classes: list[tuple[int, ...]]) -> list[str]:
    """Colours that no class's part uses: the colours of textures (backgrounds and bodies).

    A class colour is then always a part, a distractor or a small clutter shape, as in real data where
    a bird's red crown is not the colour of the sky. (With class colours in the textures too, a small
    CNN learned too slowly for a CPU demo.)
    """
    used = {VARIANTS[slot][combo[s]][1] for combo in classes for s, slot in enumerate(CLASS_SLOTS)}
    return [name for name in COLOUR_NAMES if name not in used]


def _texture(rng: np.random.Generator, height: int, width: int, colours: list[str]) -> np.ndarray:
    """A random texture (float32 [H, W, 3]) in two of ``colours``, from the pool shared by backgrounds,
    bodies and distractor bodies."""
    kind = rng.integers(6)
    c1, c2 = _two_colours(rng, colours)
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = xx * cos + yy * sin  # coordinates along and across the texture's direction
    v = yy * cos - xx * sin
    if kind == 0:  # stripes
        period = rng.uniform(4, 12)
        weight = (u / period) % 1.0 < rng.uniform(0.3, 0.7)
    elif kind == 1:  # checker
        cell = rng.uniform(3, 9)
        weight = (np.floor(u / cell) + np.floor(v / cell)) % 2 > 0
    elif kind == 2:  # dots on a grid
        spacing = rng.uniform(5, 10)
        radius = rng.uniform(0.2, 0.35) * spacing
        du = (u % spacing) - spacing / 2
        dv = (v % spacing) - spacing / 2
        weight = du * du + dv * dv < radius * radius
    elif kind == 3:  # blobs: smooth noise thresholded
        cells = int(rng.integers(3, 8))
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        weight = smooth > np.median(smooth)
    elif kind == 4:  # linear gradient
        weight = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    else:  # plain
        return np.broadcast_to(c1, (height, width, 3))
    return c1 + weight.astype(np.float32)[..., None] * (c2 - c1)


def _paint(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, colour: str | list[str]) -> None:
    """Fill ``mask`` of the canvas with a named colour, or with a random texture in two colours of a
    list of colour names."""
    if isinstance(colour, str):
        canvas[mask] = PALETTE[colour]
        return
    extent = _extent(mask)
    if extent is None:
        return
    x0, y0, x1, y1 = extent
    inside = mask[y0 : y1 + 1, x0 : x1 + 1]
    texture = _texture(rng, y1 - y0 + 1, x1 - x0 + 1, colour)  # only over the region's bounding box: cheaper
    canvas[y0 : y1 + 1, x0 : x1 + 1][inside] = texture[inside]


# ----------------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Scene:
    """One rendered image and its ground truth (all in the image's own pixels)."""

    image: np.ndarray  # uint8 [H, W, 3] RGB
    object_mask: np.ndarray  # bool [H, W]
    ignore_mask: np.ndarray  # bool [H, W]: a 2-pixel band around the object (JPEG-blurred edge)
    part_map: np.ndarray  # uint8 [H, W]: 0 background, j + 1 part j of PART_NAMES
    box: tuple[int, int, int, int]  # extent of object_mask, inclusive ends
    part_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # visible extent per part
    part_discriminative: list[bool] = field(default_factory=list)


def _extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def _object_parts(box: tuple[float, float, float, float], facing_right: bool, variants: dict[str, tuple[str, str]]):
    """Yield (part name, shape, colour or None for texture, cx, cy, rx, ry) in drawing order."""
    x0, y0, bw, bh = box

    def place(u, v, ru, rv):
        if not facing_right:
            u = 1.0 - u
        return x0 + u * bw, y0 + v * bh, max(ru * bw, 1.0), max(rv * bh, 1.0)

    for u in LEG_U:  # legs first: the body covers their tops
        v_mid, v_half = (LEG_V[0] + LEG_V[1]) / 2, (LEG_V[1] - LEG_V[0]) / 2
        yield ("legs", "vbar", LEG_COLOUR, *place(u, v_mid, LEG_HALF_WIDTH, v_half))
    yield ("body", "circle", None, *place(*BODY))
    for slot in ("tail", "crest", "head"):
        shape, colour = variants[slot]
        yield (slot, shape, colour, *place(*PART_FRAMES[slot]))


def _object_variants(classes, label: int) -> dict[str, tuple[str, str]]:
    return {slot: VARIANTS[slot][classes[label][s]] for s, slot in enumerate(CLASS_SLOTS)}


def _random_box(rng, width: int, height: int, scale: tuple[float, float], aspect: tuple[float, float]):
    """(x0, y0, w, h) of a box whose sides are ``scale`` of the image sides, placed uniformly inside it."""
    side = rng.uniform(*scale)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    bw = min(side * width * math.sqrt(ratio), 0.95 * width)
    bh = min(side * height / math.sqrt(ratio), 0.95 * height)
    return rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh


def _overlaps(a, b, margin: float) -> bool:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    apart_x = ax0 + aw + margin < bx0 or bx0 + bw + margin < ax0
    apart_y = ay0 + ah + margin < by0 or by0 + bh + margin < ay0
    return not (apart_x or apart_y)


def _draw_background(canvas: np.ndarray, rng, options: SynthOptions, texture_colours: list[str]) -> None:
    """A base texture, 3–6 large textured patches, then small clutter shapes in any colour."""
    height, width = canvas.shape[:2]
    canvas[:] = _texture(rng, height, width, texture_colours)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.35) * height
        shape = ("circle", "square", "triangle", "diamond")[rng.integers(4)]
        _paint(canvas, _shape_mask(shape, cx, cy, rx, ry, height, width), rng, texture_colours)
    clutter_shapes = ("circle", "square", "triangle", "diamond", "star", "bar", "ring")
    for _ in range(int(rng.integers(options.clutter // 2, options.clutter + 1))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.01, 0.035) * options.image_size  # smaller than the parts of the smallest object
        shape = clutter_shapes[rng.integers(len(clutter_shapes))]
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        _paint(canvas, _shape_mask(shape, cx, cy, r, r * rng.uniform(0.6, 1.6), height, width), rng, colour)


def _place_object(rng, options: SynthOptions, variants, height: int, width: int):
    """(nominal box, part label map, visible extent per part); resampled in the rare case that a part
    ends up invisible (a tiny object)."""
    for _attempt in range(20):
        object_box = _random_box(rng, width, height, options.object_scale, options.aspect_range)
        facing_right = bool(rng.integers(2))
        part_map = np.zeros((height, width), np.uint8)
        for name, shape, _colour, cx, cy, rx, ry in _object_parts(object_box, facing_right, variants):
            part_map[_shape_mask(shape, cx, cy, rx, ry, height, width)] = PART_NAMES.index(name) + 1
        part_boxes = [_extent(part_map == j + 1) for j in range(len(PART_NAMES))]
        if all(b is not None for b in part_boxes):
            return object_box, part_map, part_boxes
    raise RuntimeError("could not place an object with every part visible; raise object_scale")


def _draw_distractors(canvas, rng, options: SynthOptions, variants, object_box, texture_colours) -> None:
    """Loose parts and bodies carrying one part, in the variants' shapes and colours, never touching
    the object (so its mask stays exact and its part configuration unique)."""
    height, width = canvas.shape[:2]
    count = int(rng.integers(1, options.distractors + 1)) if options.distractors else 0
    for _ in range(count):
        if rng.uniform() < options.partial_fraction:
            small = (options.object_scale[0] * 0.8, options.object_scale[1] * 0.8)
            box = _random_box(rng, width, height, small, options.aspect_range)
            if _overlaps(box, object_box, margin=3):
                continue
            slot = CLASS_SLOTS[rng.integers(len(CLASS_SLOTS))]
            carried = {slot: VARIANTS[slot][rng.integers(len(VARIANTS[slot]))]}
            drawn = {"body", slot, "legs"} if rng.uniform() < 0.5 else {"body", slot}
            # The other slots' variants are needed by _object_parts but not drawn.
            parts = _object_parts(box, bool(rng.integers(2)), {**variants, **carried})
            for name, shape, colour, cx, cy, rx, ry in parts:
                if name in drawn:
                    _paint(canvas, _shape_mask(shape, cx, cy, rx, ry, height, width), rng, colour or texture_colours)
        else:
            slot = CLASS_SLOTS[rng.integers(len(CLASS_SLOTS))]
            shape, colour = VARIANTS[slot][rng.integers(len(VARIANTS[slot]))]
            rx = PART_FRAMES[slot][2] * object_box[2] * rng.uniform(0.7, 1.3)  # sized like the object's parts
            ry = PART_FRAMES[slot][3] * object_box[3] * rng.uniform(0.7, 1.3)
            box = (rng.uniform(0, width - 2 * rx), rng.uniform(0, height - 2 * ry), 2 * rx, 2 * ry)
            if _overlaps(box, object_box, margin=3):
                continue
            _paint(canvas, _shape_mask(shape, box[0] + rx, box[1] + ry, rx, ry, height, width), rng, colour)


def render_scene(options: SynthOptions, classes: list[tuple[int, ...]], label: int, rng: np.random.Generator) -> Scene:
    """Draw one image of class ``label`` with its ground truth; all randomness comes from ``rng``."""
    jitter = options.size_jitter
    width = int(round(options.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    height = int(round(options.image_size * rng.uniform(1 - jitter, 1 + jitter)))
    canvas = np.empty((height, width, 3), np.float32)
    texture_colours = _texture_colours(classes)
    _draw_background(canvas, rng, options, texture_colours)

    variants = _object_variants(classes, label)
    object_box, part_map, part_boxes = _place_object(rng, options, variants, height, width)
    body_texture = _texture(rng, height, width, texture_colours)
    for j, name in enumerate(PART_NAMES):
        visible = part_map == j + 1
        if name == "body":
            canvas[visible] = body_texture[visible]
        elif name == "legs":
            canvas[visible] = PALETTE[LEG_COLOUR]
        else:
            canvas[visible] = PALETTE[variants[name][1]]
    _draw_distractors(canvas, rng, options, variants, object_box, texture_colours)

    if options.noise:
        canvas += rng.integers(-options.noise, options.noise + 1, size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    object_mask = part_map > 0
    # The ignore band: 2 pixels around the object, where JPEG mixes object and background.
    ignore = cv2.dilate(object_mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~object_mask
    discriminative = dict(zip(CLASS_SLOTS, discriminative_slots(classes)))
    part_flags = [discriminative.get(name, False) for name in PART_NAMES]
    return Scene(image, object_mask, ignore, part_map, _extent(object_mask), part_boxes, part_flags)


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
    from rich.progress import Progress

    with Progress(transient=True) as bar:
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
