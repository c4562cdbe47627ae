"""Cue localization (CALM.md §4): every test image's class maps, paired into |map_y1 - map_y2|, and scored.

One forward pass per image gives the maps of all K classes, so the pairs cost no extra pass: an image of
class y takes part in every evaluated pair (y, y'), and each such (image, pair) is a row. A row's raw map is
the difference of the two class maps at the model's resolution, gathered on the maps' device. The binning
step (`calm_fast.metrics.cue_bins`) resizes it bilinearly to 224 x 224 (the difference is taken before the
resize, as the reference does), takes |.|, normalises it and counts its pixels against the pair's
differing-part mask into the per-pair integer histograms of `CuePixelAP`: one fused numba kernel on the
host, torch ops on a GPU, bit-identical. Rows of images in which none of the pair's differing parts is
visible are skipped and counted. Everything kept is integer counts, merged exactly across ranks.
A source that pays per class (gradient maps: one backward pass per class) gives only the classes of
`needed_classes`, as `ClassMapRows`. `build_cue_localization` sets the benchmark up from the `[eval]`
config and the dataset's ground truth; `include` joins the benchmarks of two passes (the model's maps over
the split, the gradient maps over its first N images) into one report, each map with its image count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calm_fast.config import Config, ConfigError
from calm_fast.data.cub_parts import CubCueTruth
from calm_fast.data.cue_truth import CueTruth, SyntheticCueTruth
from calm_fast.data.metadata import WSOLSplit
from calm_fast.errors import NonFiniteMapError
from calm_fast.metrics.cue import CuePixelAP
from calm_fast.metrics.cue_bins import NORMALIZATIONS, ThresholdGrid, bin_rows, bin_rows_torch
from calm_fast.modes import CueNormalization

# Probability maps are in [0, 1] already: the reference's CALM command only clips ("clipping"). Class
# logits (the CAM map) are not, so their differences are min-max normalised per row.
DEFAULT_NORMALIZATION = {"joint": "clip", "posterior": "clip", "class": "minmax"}
HISTOGRAM_BACKENDS = ("auto", "numba", "torch")


@dataclass(frozen=True)
class ClassMapRows:
    """Some classes' maps of a batch: `maps` [T, h, w] and `row_of` int64 [B, K], the row of `maps` that holds
    image i's map of class c, -1 where it was not computed."""

    maps: torch.Tensor
    row_of: np.ndarray


def _as_rows(name: str, class_maps, batch: int, classes: int) -> tuple[torch.Tensor, np.ndarray]:
    """(maps [N, h, w], row_of [B, K]) of a dense [B, K, h, w] tensor or a `ClassMapRows`."""
    if isinstance(class_maps, ClassMapRows):
        row_of = np.asarray(class_maps.row_of, np.int64)
        if class_maps.maps.dim() != 3 or row_of.shape != (batch, classes):
            raise ValueError(f"map {name!r}: rows must be [T, h, w] with row_of [B={batch}, K={classes}], got "
                             f"{tuple(class_maps.maps.shape)} and {row_of.shape}")
        return class_maps.maps, row_of
    if class_maps.dim() != 4 or class_maps.shape[:2] != (batch, classes):
        raise ValueError(f"map {name!r} must be [B, K={classes}, h, w] (every class) with B={batch}, "
                         f"got {tuple(class_maps.shape)}")
    # flattened: index_select, not slow multi-tensor indexing
    return class_maps.flatten(0, 1), np.arange(batch * classes, dtype=np.int64).reshape(batch, classes)


def default_normalization(map_name: str) -> str:
    """The normalisation of a map's differences: "clip" for CALM's probability maps, else "minmax"."""
    return DEFAULT_NORMALIZATION.get(map_name, "minmax")


def cue_truth_for(cfg: Config, split: WSOLSplit) -> CueTruth:
    """The split's cue ground truth: synthetic sets by their synthetic.json, CUB by its extras (eval.cub_root,
    default <data.root>/CUB; eval.cub_segmentation_root, default <cub_root>/segmentations)."""
    if (split.metadata_dir.parent / "synthetic.json").is_file():
        return SyntheticCueTruth(split)
    if split.dataset == "CUB":
        cub_root = Path(cfg.eval.cub_root or Path(cfg.data.root) / "CUB")
        return CubCueTruth(cub_root, split, cfg.eval.cub_segmentation_root or None)
    raise ConfigError(f"cue localization needs part ground truth: a synthetic dataset (synthetic.json beside "
                     f"{split.metadata_dir}) or CUB with its parts and attributes; {split.dataset!r} has neither")


def build_cue_localization(cfg: Config, split: WSOLSplit, map_names: Sequence[str], overlay_count: int = 0,
                           truth: CueTruth | None = None) -> "CueLocalization":
    """The cue benchmark of `[eval]`: grid eval.cue_grid / eval.cue_curve_interval, normalisation
    eval.cue_normalization ("auto": `default_normalization` per map)."""
    mode = CueNormalization(cfg.eval.cue_normalization)
    return CueLocalization(truth or cue_truth_for(cfg, split), map_names,
                           grid=ThresholdGrid(cfg.eval.cue_grid, cfg.eval.cue_curve_interval),
                           normalization=None if mode == CueNormalization.AUTO else mode.value,
                           overlay_count=overlay_count)


class CueLocalization:
    """The cue-localization state of one or more map sources over (this rank's shard of) a test split.

    truth: the dataset's pairs and label maps (`SyntheticCueTruth`, `CubCueTruth`). map_names: the maps
    to score, each given per batch for all K classes. normalization: one name for all maps, or per map
    name (default `default_normalization`). grid: the threshold grid (default: the reference's log grid).
    chunk_rows bounds the rows resized and binned at once (memory). histogram: "numba" (host kernel),
    "torch" (ops on the maps' device), or "auto" (torch for CUDA maps, else numba). overlay_count: keep
    the raw rows of the split's first n images (`overlays`: (index, pair) -> map name -> float32 [h, w])
    for the report's grid of cue maps.
    """

    def __init__(self, truth: CueTruth, map_names: Sequence[str], grid: ThresholdGrid | None = None,
                 normalization: str | Mapping[str, str] | None = None, chunk_rows: int = 64,
                 histogram: str = "auto", overlay_count: int = 0):
        if not map_names:
            raise ValueError("no map to score for cue localization")
        if histogram not in HISTOGRAM_BACKENDS:
            raise ValueError(f"histogram={histogram!r}: expected one of {', '.join(HISTOGRAM_BACKENDS)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if len(truth.pairs) == 0:
            raise ValueError(f"{truth.description}: no class pair differs in the evaluated numbers of parts")
        self.truth = truth
        self.grid = grid or ThresholdGrid()
        self.map_names = tuple(map_names)
        if normalization is None or isinstance(normalization, str):
            self.normalization = {name: normalization or default_normalization(name) for name in self.map_names}
        else:
            self.normalization = {name: normalization.get(name, default_normalization(name)) for name in self.map_names}
        for name, mode in self.normalization.items():
            if mode not in NORMALIZATIONS or mode == "none":
                raise ValueError(f"normalization of map {name!r}: {mode!r}; expected one of "
                                 f"{', '.join(m for m in NORMALIZATIONS if m != 'none')}")
        self.chunk_rows = chunk_rows
        self.histogram = histogram
        self.overlay_count = overlay_count
        self.overlays: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.metrics = {name: CuePixelAP(truth.pairs.groups, self.grid) for name in self.map_names}
        self.images_fed = dict.fromkeys(self.map_names, 0)  # images given to `update`, per map
        self.excluded: dict[str, str] = {}  # maps asked for but not scored -> why (the report says so)
        self._pairs_of_class = truth.pairs.pairs_of_class()
        self._class_pairs = truth.pairs.class_pairs
        self._differing = truth.pairs.differing

    def rows(self, labels: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, ...]:
        """(row image, row pair, own class, other class, scored) for a batch: one row per (image, pair of
        its class); `scored` is False where none of the pair's differing parts is visible in the image."""
        table = self._pairs_of_class[labels]  # [B, M], -1 padded
        image, slot = np.nonzero(table >= 0)
        pair = table[image, slot]
        own = labels[image]
        other = self._class_pairs[pair].sum(axis=1) - own
        scored = (visible[image] & self._differing[pair]) != 0
        return image, pair, own, other, scored

    def needed_classes(self, labels) -> np.ndarray:
        """bool [B, K]: the classes whose maps `update` reads for images of these labels (the image's own
        class and its pair partners); a source that pays per class (gradients) may compute only these."""
        labels_np = _numpy_int(labels)
        table = self._pairs_of_class[labels_np]
        needed = np.zeros((len(labels_np), self.truth.pairs.num_classes), bool)
        rows, slots = np.nonzero(table >= 0)
        needed[rows, self._class_pairs[table[rows, slots]].T] = True
        needed[np.arange(len(labels_np)), labels_np] = True
        return needed

    def update(self, maps: Mapping[str, "torch.Tensor | ClassMapRows"], labels, indices) -> None:
        """Add a batch: maps name -> [B, K, h, w] (every class's map), or a `ClassMapRows` holding at least
        the classes of `needed_classes` (any float dtype and device), the images' labels [B] and split
        indices [B] (which address the truth's label maps)."""
        missing = [name for name in self.map_names if name not in maps]
        if missing:
            raise KeyError(f"cue localization needs the maps {missing}; got {sorted(maps)}")
        labels_np = _numpy_int(labels)
        indices_np = _numpy_int(indices)
        classes = self.truth.pairs.num_classes
        rows = {name: _as_rows(name, maps[name], len(labels_np), classes) for name in self.map_names}
        label_maps, visible = self.truth.label_maps(indices_np)
        image, pair, own, other, scored = self.rows(labels_np, visible)
        for name, metric in self.metrics.items():
            metric.add_skipped(pair[~scored])
            self.images_fed[name] += len(labels_np)
        image, pair, own, other = image[scored], pair[scored], own[scored], other[scored]
        first = np.minimum(own, other)  # y1 - y2 with y1 < y2, as the reference takes it
        second = np.maximum(own, other)
        for name, (flat, row_of) in rows.items():
            low, high = row_of[image, first], row_of[image, second]
            absent = np.flatnonzero((low < 0) | (high < 0))
            if absent.size:
                i = absent[0]
                raise ValueError(f"map {name!r} lacks the map of class {first[i] if low[i] < 0 else second[i]} "
                                 f"for sample {int(indices_np[image[i]])}; give every class of `needed_classes`")
            self._score(name, flat, low, high, label_maps, image, pair, indices_np)
        for row in np.flatnonzero(indices_np[image] < self.overlay_count):
            key = (int(indices_np[image[row]]), int(pair[row]))
            self.overlays.setdefault(key, {}).update(
                {name: (flat[row_of[image[row], first[row]]].float() - flat[row_of[image[row], second[row]]].float())
                 .cpu().numpy() for name, (flat, row_of) in rows.items()})

    def _score(self, name: str, flat: torch.Tensor, low_rows: np.ndarray, high_rows: np.ndarray,
               label_maps: np.ndarray, image: np.ndarray, pair: np.ndarray, samples: np.ndarray) -> None:
        """Bin rows `flat[low_rows] - flat[high_rows]` (the maps of y1 and y2 of each row's image; `samples`:
        the split index of each batch image, to name a broken map)."""
        device = flat.device
        use_torch = self.histogram == "torch" or (self.histogram == "auto" and device.type == "cuda")
        labels_on_device = torch.from_numpy(label_maps).to(device) if use_torch else None
        bits = self._differing[pair]
        mode = self.normalization[name]
        metric = self.metrics[name]
        for lo in range(0, len(pair), self.chunk_rows):
            part = slice(lo, lo + self.chunk_rows)
            rows_image = torch.from_numpy(image[part]).to(device)
            low = flat.index_select(0, torch.from_numpy(low_rows[part]).to(device))
            high = flat.index_select(0, torch.from_numpy(high_rows[part]).to(device))
            values = low.float() - high.float()  # at the maps' resolution: resized while binning
            finite = torch.isfinite(values).flatten(1).all(dim=1)
            if not bool(finite.all()):  # clipping or min-max would turn NaN/±inf into plausible numbers
                row = lo + int(np.flatnonzero(~finite.cpu().numpy())[0])
                classes = tuple(int(c) for c in self._class_pairs[pair[row]])
                raise NonFiniteMapError(f"the {name!r} map of sample {int(samples[image[row]])} is not finite (NaN "
                                        f"or ±inf) for the class pair {classes}: the model's maps are broken")
            if use_torch:
                counts = bin_rows_torch(values, labels_on_device, rows_image, torch.from_numpy(bits[part]).to(device),
                                        self.grid, mode)
            else:
                counts = bin_rows(values.cpu().numpy(), label_maps, image[part], bits[part], self.grid, mode)
            metric.add_rows(counts, pair[part])

    # -- state: named int64 arrays, the same on every rank

    def state(self) -> dict[str, np.ndarray]:
        state = {f"{name}/{key}": value for name, metric in self.metrics.items()
                 for key, value in metric.state_dict().items()}
        state.update({f"{name}/images_fed": np.array(count, np.int64) for name, count in self.images_fed.items()})
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        for name, metric in self.metrics.items():
            prefix = f"{name}/"
            own = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            self.images_fed[name] = int(_numpy_int(own.pop("images_fed")))
            metric.load_state_dict(own)

    def merge(self, other: "CueLocalization") -> "CueLocalization":
        """Add another shard's state of the same maps; returns self."""
        for name, metric in self.metrics.items():
            metric.merge(other.metrics[name])
            self.images_fed[name] += other.images_fed[name]
        return self

    def include(self, other: "CueLocalization") -> "CueLocalization":
        """Take in the maps of another benchmark over the same pairs and grid (e.g. the gradient maps of the
        attribution pass), with their normalisation, image counts and overlays; returns self."""
        shared = set(self.map_names) & set(other.map_names)
        if shared:
            raise ValueError(f"both cue benchmarks score the maps {sorted(shared)}")
        if not (self.grid.same_as(other.grid) and np.array_equal(self.truth.pairs.class_pairs,
                                                                 other.truth.pairs.class_pairs)):
            raise ValueError("cannot join cue benchmarks of different class pairs or threshold grids")
        self.map_names += other.map_names
        self.metrics.update(other.metrics)
        self.normalization.update(other.normalization)
        self.images_fed.update(other.images_fed)
        self.excluded.update(other.excluded)
        for key, maps in other.overlays.items():
            self.overlays.setdefault(key, {}).update(maps)
        return self

    # -- numbers

    def results(self, cumulative: bool = False) -> dict[str, Any]:
        """Per map name: `CuePixelAP.compute()` (fresh accumulator per pair) with each pair's classes and
        differing parts, its normalisation, the images it was computed on (`num_images`), and with
        cumulative=True also `cumulative`: the reference's never-reset number, labelled as such. Plus the
        ground truth's description, its checks (CUB: the pair counts against the published ones), the
        pairs per number of differing parts and `excluded`: maps asked for but not scored, with why."""
        pairs = self.truth.pairs
        out: dict[str, Any] = {"truth": self.truth.description, "checks": list(self.truth.checks),
                               "group_counts": {str(g): c for g, c in sorted(pairs.group_counts.items())},
                               "maps": {}, **({"excluded": dict(self.excluded)} if self.excluded else {})}
        for name, metric in self.metrics.items():
            computed = metric.compute()
            for p, row in enumerate(computed["pairs"]):
                row.update(classes=pairs.class_pairs[p].tolist(), differing=pairs.differing_names(p))
            computed["normalization"] = self.normalization[name]
            computed["num_images"] = self.images_fed[name]
            if cumulative:
                reference = metric.compute(cumulative=True)
                computed["cumulative"] = {key: reference[key] for key in ("accumulator", "groups", "mean_pxap")}
            out["maps"][name] = computed
        return out


def _numpy_int(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(np.int64, copy=False)
