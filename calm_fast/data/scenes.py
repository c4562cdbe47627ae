"""The scenes of the synthetic WSOL dataset: its classes (part variants of fixed shape and colour), the
drawing of parts, textures, clutter and distractors, and `render_scene`, which draws one image with its
object box, object and ignore masks and part boxes from a seeded random stream (design: README.md, "The
synthetic dataset"). `calm_fast.data.synthetic` writes scenes as a dataset.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["SynthOptions", "Scene", "class_table", "discriminative_slots", "render_scene"]

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
