"""Class-agnostic score maps that a WSOL method must beat: they look at no class and learn nothing.

- ``centre_gaussian_map``: a Gaussian centred on the image. It scores well when objects sit in the
  middle on average (a dataset bias, not localization).
- ``image_energy_map``: where the image has strong edges, the squared colour gradient smoothed by a
  Gaussian of ``sigma_frac`` of the image side (1.5 % by default; 1–2 % is the fair range: without
  smoothing, the map is a speckle of single edge pixels whose boxes are poor, and with heavy smoothing it
  degrades towards the centred map). It scores well when objects are simply the busiest regions.

Both return float32 ``[h, w]`` maps, not normalised (the evaluation pipeline normalises every map).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["centre_gaussian_map", "image_energy_map"]


def centre_gaussian_map(h: int, w: int, sigma_frac: float = 0.25) -> np.ndarray:
    """Gaussian centred on the image centre, standard deviation ``sigma_frac`` of each side."""
    if h < 1 or w < 1 or sigma_frac <= 0:
        raise ValueError(f"centre_gaussian_map: need h, w >= 1 and sigma_frac > 0, got {h}, {w}, {sigma_frac}")
    y = (np.arange(h, dtype=np.float64) - (h - 1) / 2) / (sigma_frac * h)
    x = (np.arange(w, dtype=np.float64) - (w - 1) / 2) / (sigma_frac * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def image_energy_map(image: np.ndarray, sigma_frac: float = 0.015) -> np.ndarray:
    """Smoothed gradient energy of an image (``[h, w]`` or ``[h, w, c]``, any numeric dtype).

    The energy is the sum over channels of the squared 3×3 Sobel derivatives in x and y; it is then
    blurred by a Gaussian whose standard deviation is ``sigma_frac`` times the mean image side (no
    blur when ``sigma_frac`` is 0).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image_energy_map: expected an [h, w] or [h, w, c] image, got shape {image.shape}")
    if sigma_frac < 0:
        raise ValueError(f"image_energy_map: sigma_frac must be >= 0, got {sigma_frac}")
    pixels = image.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    energy = np.zeros(pixels.shape[:2], np.float32)
    for c in range(pixels.shape[2]):
        channel = np.ascontiguousarray(pixels[..., c])
        gx = cv2.Sobel(channel, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
        gy = cv2.Sobel(channel, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
        energy += gx * gx + gy * gy
    sigma = sigma_frac * (image.shape[0] + image.shape[1]) / 2
    if sigma > 0:
        energy = cv2.GaussianBlur(energy, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return energy
