"""Control maps for the attribution benchmarks: maps that know nothing of the cue, to read the others against.

- "centre-gaussian": the centred Gaussian of `calm_fast.evaluate.baselines` (σ = 1/4 of each side), the same for
  every image: what a score owes to objects sitting mid-frame.
- "random": uniform noise keyed on (seed, image index) (`keyed_random`): the floor of every benchmark.
- "blurred-cam": a model's own map, resized bilinearly to the input size and blurred by a Gaussian of
  σ = `blur_sigma_frac` × the mean input side (default 0.1, 22.4 px at 224², about three cells of a 28×28
  map; edges replicated): the same evidence with its detail removed, so a benchmark that rewards the blurred
  map as much as the sharp one does not measure where the cue is.

All return fp32 [B, H, W] torch tensors at the input size, not normalised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from calm_fast.evaluate.attribution.keyed_random import RANDOM_MAP, key64, keyed_hash31, uniform_from_hash
from calm_fast.evaluate.attribution.remove_classify import resize_maps
from calm_fast.evaluate.baselines import centre_gaussian_map

CONTROLS = ("centre-gaussian", "random", "blurred-cam")
BLUR_SIGMA_FRAC = 0.1


def centre_gaussian_maps(batch: int, size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The centred Gaussian, one per image: fp32 [batch, H, W]."""
    gaussian = torch.from_numpy(centre_gaussian_map(*size)).to(device)
    return gaussian.expand(batch, *size).contiguous()


def random_maps(indices: Sequence[int], size: tuple[int, int], seed: int = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) noise keyed on (seed, image index): fp32 [B, H, W]."""
    keys = [key64(RANDOM_MAP, seed, int(index)) for index in indices]
    return uniform_from_hash(keyed_hash31(keys, size[0] * size[1], device)).reshape(len(keys), *size)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of fp32 [B, H, W] maps (kernel radius ceil(3σ), edges replicated)."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def blurred_maps(maps, size: tuple[int, int], sigma_frac: float = BLUR_SIGMA_FRAC,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """`maps` [B, h, w] resized bilinearly to `size`, then blurred with σ = sigma_frac × mean side (px)."""
    if sigma_frac < 0:
        raise ValueError(f"sigma_frac must be >= 0, got {sigma_frac}")
    return gaussian_blur(resize_maps(maps, size, device), sigma_frac * (size[0] + size[1]) / 2)


def control_maps(names: Sequence[str], indices: Sequence[int], size: tuple[int, int], cam_maps=None,
                 seed: int = 0, blur_sigma_frac: float = BLUR_SIGMA_FRAC,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The controls `names` for one batch: name -> fp32 [B, H, W]. "blurred-cam" needs `cam_maps` [B, h, w]."""
    out = {}
    for name in names:
        if name == "centre-gaussian":
            out[name] = centre_gaussian_maps(len(indices), size, device)
        elif name == "random":
            out[name] = random_maps(indices, size, seed, device)
        elif name == "blurred-cam":
            if cam_maps is None:
                raise ValueError("control 'blurred-cam' needs the model's maps (cam_maps)")
            out[name] = blurred_maps(cam_maps, size, blur_sigma_frac, device)
        else:
            raise ValueError(f"control {name!r}: expected one of {', '.join(CONTROLS)}")
    return out
