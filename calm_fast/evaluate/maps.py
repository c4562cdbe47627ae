"""Map sources: what turns a batch of images into score maps for the metrics. A trained WSOL model
(`ModelMaps`: the ground-truth class's maps of the chosen kinds, every class's maps for cue localization,
and the predicted classes, all from one forward pass) and the class-agnostic baselines (`BaselineMaps`,
from `calm_fast.evaluate.baselines`) share one interface, `MapFn`, so `evaluate_maps` scores them through
the same metric code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from calm_fast.config import ConfigError
from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD
from calm_fast.evaluate import baselines
from calm_fast.head import all_class_maps, attribution_map, class_log_probs
from calm_fast.models.wsol import check_method
from calm_fast.modes import CAM_MAPS_ONLY, Baseline, MapKind, Method, choices, map_kinds_of


@dataclass
class MapBatch:
    """What a map source returns for one batch.

    maps: map name -> [B, h, w] scores (any float dtype, numpy or torch, any resolution: they are
    resized to 224×224 and normalised by the metric pipeline). pred_classes: [B] predicted classes, or
    None for a source that does not classify (then top-1 localization and accuracy are not reported).
    class_maps: map name -> [B, K, h, w], every class's map (for cue localization), or None.
    forward_passes: the model inputs this batch cost (B for one pass per image, 0 for baselines).
    """

    maps: dict[str, np.ndarray | torch.Tensor]
    pred_classes: np.ndarray | torch.Tensor | None = None
    class_maps: dict[str, torch.Tensor] | None = None
    forward_passes: int = 0


# map_fn(images [B,3,S,S] as the loader gives them, labels [B], indices [B]) -> MapBatch
MapFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], MapBatch]


class ModelMaps:
    """A WSOL model as a map source: the GT-class maps of the chosen kinds and the predicted classes.

    The model runs in eval mode under no_grad on `device`; the head math (`class_log_probs`, fused
    kernels on CUDA) decides the predicted class, `attribution_map` gives each map kind, and
    `all_class_maps` the maps of every class for the `class_map_kinds` (kept on the device), from the
    same forward pass.
    """

    def __init__(self, model: torch.nn.Module, method: str, kinds: tuple[str, ...], prior: str = "relu",
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 class_map_kinds: tuple[str, ...] = ()):
        check_method(method)
        check_map_kinds(kinds, method)
        if class_map_kinds:
            check_map_kinds(class_map_kinds, method)
        self.model, self.method, self.kinds, self.prior = model, method, tuple(kinds), prior
        self.class_map_kinds = tuple(class_map_kinds)
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MapBatch:
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        class_logits, location_scores = self.model(images)
        predicted = class_log_probs(class_logits, location_scores, self.method, self.prior).argmax(dim=1)
        maps = {kind: attribution_map(class_logits, location_scores, labels, kind, self.prior).cpu()
                for kind in self.kinds}
        class_maps = {kind: all_class_maps(class_logits, location_scores, kind, self.prior)
                      for kind in self.class_map_kinds} or None
        return MapBatch(maps=maps, pred_classes=predicted.cpu(), class_maps=class_maps, forward_passes=len(images))


def check_map_kinds(kinds, method: str) -> tuple[MapKind, ...]:
    """`kinds` as MapKinds, each checked: a map kind, and one that `method` has (CAM: only its class map)."""
    if not kinds:
        raise ConfigError("no map kind to evaluate")
    parsed = []
    for kind in kinds:
        if kind not in tuple(MapKind):
            raise ConfigError(f"map kind {kind!r}: expected one of {choices(MapKind)}")
        if MapKind(kind) not in map_kinds_of(Method(method)):
            raise ConfigError(f"map kind '{kind}' {CAM_MAPS_ONLY}")
        parsed.append(MapKind(kind))
    return tuple(parsed)


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo the loaders' ImageNet normalisation: float [B,3,S,S] -> uint8 [B,S,S,3] (RGB)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class BaselineMaps:
    """Class-agnostic baselines (`calm_fast.evaluate.baselines`) as a map source, at the loader's resolution.

    "centre-gaussian": the same centred Gaussian for every image; "image-energy": the smoothed gradient
    energy of the image as the model would see it (resized to input_size², normalisation undone).
    """

    def __init__(self, names: tuple[str, ...], energy_sigma_frac: float | None = None):
        for name in names:
            if name not in tuple(Baseline):
                raise ValueError(f"baseline {name!r}: expected one of {choices(Baseline)}")
        if not names:
            raise ValueError("no baseline to evaluate")
        self.names = tuple(names)
        self.energy_sigma_frac = energy_sigma_frac

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> MapBatch:
        batch, _, height, width = images.shape
        maps: dict[str, np.ndarray] = {}
        if Baseline.CENTRE_GAUSSIAN in self.names:
            maps[Baseline.CENTRE_GAUSSIAN] = np.broadcast_to(baselines.centre_gaussian_map(height, width),
                                                      (batch, height, width))
        if Baseline.IMAGE_ENERGY in self.names:
            pixels = images_to_uint8(images)
            kwargs = {} if self.energy_sigma_frac is None else {"sigma_frac": self.energy_sigma_frac}
            maps[Baseline.IMAGE_ENERGY] = np.stack([baselines.image_energy_map(image, **kwargs) for image in pixels])
        return MapBatch(maps=maps, pred_classes=None)
