"""Every threshold's contour boxes in one or two union-find sweeps per score map (numba kernels).

After uint8 quantisation the reference evaluator's foreground at integer threshold θ is `u > θ`, θ = 0..254,
and these foregrounds are nested. So instead of one `cv2.findContours` per threshold:

* **Outer contours** are the 8-connected components of `u > θ`. Adding pixels from high `u` to low `u` to a
  union-find builds them for every θ at once; a component's bounding box only changes when it gains pixels.
* **Hole contours** (RETR_TREE's inner borders) are the 4-connected components of the background `u <= θ`
  that do not reach the image border. With `r` the grey-level hole filling of `u` (min over 4-paths to
  the border of the max `u` on the path), a pixel is in a hole exactly for `u <= θ < r`, and a hole's
  pixels share one `r`, where it joins the outside. So holes are the same sweep run on `255 - u` over the
  pixels with `u < r` only, 4-connected, each component retired at its `r`. A hole whose pixels span
  (x0, y0)-(x1, y1) is traced on the foreground around it, so its box is (x0-1, y0-1, x1+2, y1+2).
* **Single-contour mode** keeps the contour of largest `cv2.contourArea`. The largest one is always an
  outermost outer contour (a nested contour lies inside it and comes after it in OpenCV's list), whose
  polygon area is that of its component with the holes filled in: over every 2x2 pixel window, 1 for a
  window fully inside, 1/2 for a window with three pixels inside, else 0 (the border polygon joins pixel
  centres and cuts three-pixel windows along the diagonal). The hole filling `r` fills the holes at every θ
  at once, so this sweep runs on `r` and sums the windows per component. Ties keep OpenCV's first
  contour: for outermost contours, the one whose first pixel in raster order comes last.

Each component state (a box valid for a range of θ) is offered to a per-θ best through a sparse-table
range update, so the cost is O(pixels · α(pixels)) per map whatever the threshold grid. The OpenCV rules
(8-connected blobs, hole boxes, polygon areas, contour order) are checked against OpenCV itself on
thousands of maps in tests/test_metrics_equivalence.py.

Speed: maps are padded with a never-added ring, so neighbours need no bounds checks. A new pixel's added
neighbours that are consecutive around its 8-ring touch each other (8- and even 4-adjacent), so they were
joined already; one find/union per run of them is enough, read from a table indexed by the neighbour mask.
The union-find runs over components numbered as they are born, each with one 32-byte row of state, so
the hot data stays in L2 even on noise; offers are inlined, and in V2 mode (key = IoU) they are a
branch-free max. Pure noise is the worst case (about one offer per pixel): ~3.7 ms per 224 x 224 map on
one core of the project's CPU machine, against ~1.8 ms for CAM-like maps (`calm-fast bench metrics`).
"""

from __future__ import annotations

import numba
import numpy as np

NUM_LEVELS = 256  # uint8 thresholds θ = 0..255 (θ = 255 never has foreground)
_TABLE_DEPTH = 9  # sparse-table rows: block lengths 1, 2, 4, ..., 256

# The 8-ring of a pixel, clockwise from north, as (dy, dx); bit k of a neighbour mask is ring[k].
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
_ORTHOGONAL = (0, 2, 4, 6)


def _run_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 8-bit neighbour mask: one ring index per run of set bits to join (8- and 4-connected), and
    the number of the pixel's four 2x2 windows that reach >= 3 added pixels once it is added."""
    runs8 = np.full((256, 4), -1, np.int64)
    runs4 = np.full((256, 4), -1, np.int64)
    area_steps = np.zeros(256, np.int64)
    for mask in range(256):
        bits = [(mask >> k) & 1 for k in range(8)]
        if all(bits):
            runs = [list(range(8))]
        else:
            # Start after an unset bit so no run wraps around the ring's start.
            first = next(k for k in range(8) if not bits[k])
            runs, current = [], []
            for step in range(1, 9):
                k = (first + step) % 8
                if bits[k]:
                    current.append(k)
                elif current:
                    runs.append(current)
                    current = []
            if current:
                runs.append(current)
        reps8 = [run[0] for run in runs]
        reps4 = [next(k for k in run if k in _ORTHOGONAL) for run in runs if any(k in _ORTHOGONAL for k in run)]
        runs8[mask, :len(reps8)] = reps8
        runs4[mask, :len(reps4)] = reps4
        # Windows around the pixel: each is the pixel plus three ring members (two orthogonal, one diagonal).
        for window in ((6, 7, 0), (0, 1, 2), (2, 3, 4), (4, 5, 6)):
            area_steps[mask] += (1 + sum(bits[k] for k in window)) >= 3
    return runs8, runs4, area_steps


_RUNS_8, _RUNS_4, _AREA_STEPS = _run_tables()
_RING_DY = np.array([dy for dy, _ in _RING], np.int64)
_RING_DX = np.array([dx for _, dx in _RING], np.int64)
# Fields of a component's row in the sweep's `state` table.
_X0, _Y0, _X1, _Y1, _BORN, _FIRST, _AREA2, _SIZE = range(8)
_FLOOR_LOG2 = np.array([0, 0] + [int(length).bit_length() - 1 for length in range(2, NUM_LEVELS + 1)], np.int64)


@numba.njit(cache=True, nogil=True)
def _find(parent, node):
    while parent[node] != node:  # path halving: one pass, and ~4% faster than two-pass compression here
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


@numba.njit(cache=True, nogil=True, inline="always")
def _max_iou(x0, y0, x1, y1, gt_boxes):
    """Max IoU of one predicted box over the GT boxes, inclusive ends, computed as the reference does."""
    best = 0.0
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    for g in range(gt_boxes.shape[0]):
        gx0, gy0, gx1, gy1 = gt_boxes[g, 0], gt_boxes[g, 1], gt_boxes[g, 2], gt_boxes[g, 3]
        inter = max(0, min(x1, gx1) - max(x0, gx0) + 1) * max(0, min(y1, gy1) - max(y0, gy0) + 1)
        union = area + (gx1 - gx0 + 1) * (gy1 - gy0 + 1) - inter
        iou = 0.0 if union <= 0 else inter / union
        if iou > best or g == 0:
            best = iou
    return best


@numba.njit(cache=True, nogil=True, inline="always")
def _blocks(lo, hi):
    """The two overlapping power-of-two blocks that cover θ = lo..hi, as (row, column, column).

    Row k, column c of the tables stands for the block θ = c .. c + 2**k - 1; `_push_down` resolves them.
    """
    row = _FLOOR_LOG2[hi - lo + 1]  # a table, not a loop: this runs about once per added pixel
    return row, lo, hi - (1 << row) + 1


@numba.njit(cache=True, nogil=True)
def _push_down(key_table, iou_table):
    """Resolve the blocks: row 0 then holds, per θ, the IoU of the offered state with the largest key."""
    for row in range(_TABLE_DEPTH - 1, 0, -1):
        half = 1 << (row - 1)
        for column in range(NUM_LEVELS - (1 << row) + 1):
            for child in (column, column + half):
                if key_table[row, column] > key_table[row - 1, child]:
                    key_table[row - 1, child] = key_table[row, column]
                    iou_table[row - 1, child] = iou_table[row, column]


@numba.njit(cache=True, nogil=True)
def _pad(image):
    """Flat (H+2, W+2) copy of a uint8 [H, W] image inside a ring of zeros."""
    height, width = image.shape
    padded = np.zeros((height + 2, width + 2), np.uint8)
    padded[1:-1, 1:-1] = image
    return padded.ravel()


@numba.njit(cache=True, nogil=True)
def _pad_holes(padded, filled):
    """Hole-sweep inputs from the padded map u and its hole filling r: 255 - u where u < r (the pixel lies
    in a hole for u <= θ < r), else 0; and the sweep level 255 - r at which that hole joins the outside."""
    hole_levels = np.zeros(padded.size, np.uint8)
    death = np.zeros(padded.size, np.uint8)
    for p in range(padded.size):
        if padded[p] < filled[p]:
            hole_levels[p] = 255 - padded[p]
            death[p] = 255 - filled[p]
    return hole_levels, death


@numba.njit(cache=True, nogil=True)
def _sweep(padded, death, height, width, gt_boxes, holes, largest_only, key_table, iou_table):
    """Offer every component of `padded > t`, for every t = 0..254, to the tables.

    `padded` is a (H+2, W+2) map with a ring of zeros (never added). Pixels join from level 255 down to 1;
    a component's box (and area) is one state from the level where it last changed down to the level
    before it next changes, and is offered when it ends: just before the component changes again, or
    after the last level. Modes:

    * foreground (`holes=False`): 8-connected; t is θ; key = IoU, or with `largest_only` twice the contour
      area then the first pixel's raster index (OpenCV's `max(contours, key=contourArea)`).
    * holes (`holes=True`): `padded` holds 255 - u on the pixels that are inside a hole at some θ (u < r,
      r the filled map) and 0 elsewhere; 4-connected; t = 254 - θ; key = IoU of the grown hole box. A hole
      joins the outside background at θ = r, which is the same for all of its pixels: `death` holds the
      matching sweep level 255 - r, where the component's last state is offered and it is marked dead.
    """
    stride = width + 2
    ring = _RING_DY * stride + _RING_DX
    runs = _RUNS_4 if holes else _RUNS_8
    pixels = height * width

    # Counting sort of the image pixels by level; within a level they stay in raster order. The row
    # rides along so no division is needed per pixel.
    start = np.zeros(NUM_LEVELS + 1, np.int64)
    for y in range(1, height + 1):
        for p in range(y * stride + 1, y * stride + width + 1):
            start[padded[p] + 1] += 1
    for level in range(NUM_LEVELS):
        start[level + 1] += start[level]
    fill = start[:NUM_LEVELS].copy()
    order = np.empty(pixels, np.int32)
    order_row = np.empty(pixels, np.int32)
    for y in range(1, height + 1):
        for p in range(y * stride + 1, y * stride + width + 1):
            order[fill[padded[p]]] = p
            order_row[fill[padded[p]]] = y
            fill[padded[p]] += 1

    # Union-find over components, numbered as they are born, not over pixels: `label` maps an added
    # pixel to the component it joined, and a component's fields sit in one 32-byte row of `state`.
    # The hot data is then a few hundred KB even on noise, where per-pixel arrays spilled out of L2.
    label = np.empty(padded.size, np.int32)
    parent = np.empty(pixels, np.int32)
    state = np.empty((pixels, 8), np.int32)  # _X0, _Y0, _X1, _Y1 (image coordinates), _BORN, _FIRST, _AREA2, _SIZE
    dead = np.zeros(pixels, np.bool_)
    death_head = np.full(NUM_LEVELS, -1, np.int32)  # per sweep level, a linked list of holes dying there
    death_next = np.empty(pixels, np.int32)
    count = 0

    for level in range(NUM_LEVELS - 1, 0, -1):
        hole = death_head[level]
        while hole >= 0:
            r = _find(parent, hole)
            if not dead[r]:
                dead[r] = True
                _offer(key_table, iou_table, holes, largest_only, level, state, r, height, width, gt_boxes)
            hole = death_next[hole]
        for i in range(start[level], start[level + 1]):
            p = order[i]
            y = order_row[i] - 1
            x = p - order_row[i] * stride - 1
            mask = 0
            for k in range(8):  # branch-free: "q joined before p" is data-dependent
                q = p + ring[k]
                mask |= ((padded[q] > level) | ((padded[q] == level) & (q < p))) << k
            if runs[mask, 0] < 0:  # no added neighbour: a new component
                parent[count] = count
                label[p] = count
                state[count, _X0], state[count, _Y0], state[count, _X1], state[count, _Y1] = x, y, x, y
                state[count, _BORN], state[count, _FIRST] = level, p
                state[count, _AREA2], state[count, _SIZE] = _AREA_STEPS[mask], 1
                if death[p] > 0:  # a hole: listed to be retired at the level where it joins the outside
                    death_next[count] = death_head[death[p]]
                    death_head[death[p]] = count
                count += 1
                continue
            # Join the first neighbouring component, then merge any other one into it.
            root = _find(parent, label[p + ring[runs[mask, 0]]])
            if state[root, _BORN] != level:  # its state from an earlier level ends here
                _offer(key_table, iou_table, holes, largest_only, level, state, root, height, width, gt_boxes)
                state[root, _BORN] = level
            state[root, _X0] = min(state[root, _X0], x)
            state[root, _Y0] = min(state[root, _Y0], y)
            state[root, _X1] = max(state[root, _X1], x)
            state[root, _Y1] = max(state[root, _Y1], y)
            state[root, _FIRST] = min(state[root, _FIRST], p)
            state[root, _SIZE] += 1
            for j in range(1, 4):
                if runs[mask, j] < 0:
                    break
                other = _find(parent, label[p + ring[runs[mask, j]]])
                if other == root:
                    continue
                if state[other, _BORN] != level:
                    _offer(key_table, iou_table, holes, largest_only, level, state, other, height, width,
                           gt_boxes)
                if state[root, _SIZE] < state[other, _SIZE]:
                    root, other = other, root
                parent[other] = root
                state[root, _BORN] = level
                for field in (_X0, _Y0, _FIRST):
                    state[root, field] = min(state[root, field], state[other, field])
                for field in (_X1, _Y1):
                    state[root, field] = max(state[root, field], state[other, field])
                state[root, _AREA2] += state[other, _AREA2]
                state[root, _SIZE] += state[other, _SIZE]
            label[p] = root
            # The pixel's four 2x2 windows now lie in this component (their other pixels are its
            # neighbours): each reaching 3 or 4 pixels adds 1/2 to the contour's polygon area.
            state[root, _AREA2] += _AREA_STEPS[mask]
    for c in range(count):
        if parent[c] == c and not dead[c]:
            _offer(key_table, iou_table, holes, largest_only, 0, state, c, height, width, gt_boxes)


@numba.njit(cache=True, nogil=True, inline="always")
def _offer(key_table, iou_table, holes, largest_only, lo, state, c, height, width, gt_boxes):
    """Score component c's state, valid for sweep levels t in [lo, its _BORN - 1], and offer it (the hole
    sweep's t is 254 - θ).

    Box rules of the reference: OpenCV's bounding rect (x, y, w, h) becomes (x, y, x+w, y+h) clipped to
    the last row/column, one pixel larger than the pixels; a hole's contour runs on the foreground around
    it, one pixel further out on every side.
    """
    hi = state[c, _BORN] - 1
    x0, y0, x1, y1 = state[c, _X0], state[c, _Y0], state[c, _X1], state[c, _Y1]
    if holes:
        lo, hi = NUM_LEVELS - 2 - hi, NUM_LEVELS - 2 - lo
        iou = _max_iou(x0 - 1, y0 - 1, min(x1 + 2, width - 1), min(y1 + 2, height - 1), gt_boxes)
    else:
        iou = _max_iou(x0, y0, min(x1 + 1, width - 1), min(y1 + 1, height - 1), gt_boxes)
    row, left, right = _blocks(lo, hi)
    if largest_only:  # key: twice the contour area, then the first pixel's raster index (padded frame)
        key = float(state[c, _AREA2]) * ((height + 2) * (width + 2)) + float(state[c, _FIRST])
        for column in (left, right):
            if key > key_table[row, column]:
                key_table[row, column] = key
                iou_table[row, column] = iou
    else:  # V2: the key is the IoU itself, so a branch-free max into key_table alone is enough
        for column in (left, right):
            key_table[row, column] = max(key_table[row, column], iou)


@numba.njit(cache=True, nogil=True)
def _fill_holes(padded, height, width):
    """Grey-level hole filling of a padded map: min over 4-paths from each pixel to the image border of the
    max level on the path. Same padded layout out, ring included (zeros).

    Priority flood from the border with a bucket queue; a pixel's value is final when it is first reached.
    The ring starts out reached, so neighbours need no bounds checks.
    """
    stride = width + 2
    filled = np.zeros(padded.size, np.uint8)
    reached = np.zeros(padded.size, np.bool_)
    head = np.full(NUM_LEVELS, -1, np.int32)  # one linked stack of pixels per level
    next_in_bucket = np.empty(padded.size, np.int32)
    ring = reached.reshape(height + 2, width + 2)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    for y in range(1, height + 1):
        for x in range(1, width + 1):
            p = y * stride + x
            if (y == 1 or x == 1 or y == height or x == width) and not reached[p]:
                reached[p] = True
                filled[p] = padded[p]
                next_in_bucket[p] = head[padded[p]]
                head[padded[p]] = p
    for level in range(NUM_LEVELS):
        while head[level] >= 0:
            p = head[level]
            head[level] = next_in_bucket[p]
            for q in (p - stride, p - 1, p + 1, p + stride):
                if reached[q]:
                    continue
                reached[q] = True
                filled[q] = max(level, padded[q])
                next_in_bucket[q] = head[filled[q]]
                head[filled[q]] = q
    return filled


@numba.njit(cache=True, nogil=True)
def _level_best_iou(levels, gt_boxes, multi_contour, out):
    """out[θ] = best IoU over the boxes at integer threshold θ; no contour gives the box (0, 0, 0, 0)."""
    height, width = levels.shape
    key_table = np.full((_TABLE_DEPTH, NUM_LEVELS), -np.inf)
    iou_table = np.zeros((_TABLE_DEPTH, NUM_LEVELS), np.float64)
    padded = _pad(levels)
    filled = _fill_holes(padded, height, width)
    no_death = np.zeros(padded.size, np.uint8)
    if multi_contour:
        _sweep(padded, no_death, height, width, gt_boxes, False, False, key_table, iou_table)
        hole_levels, death = _pad_holes(padded, filled)
        _sweep(hole_levels, death, height, width, gt_boxes, True, False, key_table, iou_table)
    else:
        _sweep(filled, no_death, height, width, gt_boxes, False, True, key_table, iou_table)
    _push_down(key_table, iou_table)
    # Below the map's peak some contour exists and was offered; from the peak up there is no foreground
    # and the reference scores the box (0, 0, 0, 0). In V2 mode the key is the IoU, so key_table holds it.
    peak = levels.max()
    empty = _max_iou(0, 0, 0, 0, gt_boxes)
    for level in range(NUM_LEVELS):
        if level >= peak:
            out[level] = empty
        else:
            out[level] = key_table[0, level] if multi_contour else iou_table[0, level]


@numba.njit(cache=True, nogil=True)
def level_best_iou_serial(quantized, gt_boxes, gt_offsets, multi_contour):
    """Per-level best IoU [N, 256] of uint8 maps [N, H, W]; map i's GT boxes are gt_boxes[off[i]:off[i+1]]."""
    out = np.empty((quantized.shape[0], NUM_LEVELS), np.float64)
    for i in range(quantized.shape[0]):
        _level_best_iou(quantized[i], gt_boxes[gt_offsets[i]:gt_offsets[i + 1]], multi_contour, out[i])
    return out


@numba.njit(cache=True, nogil=True, parallel=True)
def level_best_iou_parallel(quantized, gt_boxes, gt_offsets, multi_contour):
    """`level_best_iou_serial` with the maps spread over numba's worker threads."""
    out = np.empty((quantized.shape[0], NUM_LEVELS), np.float64)
    for i in numba.prange(quantized.shape[0]):
        _level_best_iou(quantized[i], gt_boxes[gt_offsets[i]:gt_offsets[i + 1]], multi_contour, out[i])
    return out
