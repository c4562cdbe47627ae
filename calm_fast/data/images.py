"""Image files to RGB pixels, the two ways calm-fast needs: `decode_rgb` for the torch loader and the
overlays (any PIL-readable file as an RGB image in its stored orientation; a broken file is an error
naming it), and `load_for_storage` for `calm-fast convert` (the same view, plus the repairs of DATA.md
counted by name: grayscale, CMYK, palette or alpha converted, a PNG named .jpg decoded by content, EXIF
orientation ignored, large images shrunk, truncated files grey-filled on request; anything else is an
`ImageProblem` naming the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from calm_fast.errors import InputFileError, UserError

__all__ = ["ImageProblem", "MAX_STORED_SIDE", "decode_rgb", "load_for_storage"]

# FFCV stores width and height as uint16.
MAX_STORED_SIDE = 65535
_FORMAT_OF_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
                     ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# Pixel modes that PIL's convert("RGB") maps faithfully; others (16-bit, float) are refused.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
_EXIF_ORIENTATION = 0x0112


class ImageProblem(UserError, ValueError):
    """An image that cannot be stored faithfully; the message names the file."""


def decode_rgb(path) -> Image.Image:
    """Decode an image file into an RGB PIL image in its stored orientation."""
    try:
        with Image.open(path) as image:
            image.load()
            # convert() also covers L, P, CMYK, RGBA (alpha dropped), I;16 ...; copy() detaches the file.
            return image.copy() if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise InputFileError(f"{path}: cannot decode image ({type(error).__name__}: {error})") from None


def load_for_storage(path: str | Path, max_resolution: int | None = None,
             allow_truncated: bool = False) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """Read one image as it will be stored: ``(uint8 [H, W, 3] RGB, repairs, original (width, height))``.

    ``repairs`` names every repair made (see the module docstring); raises :class:`ImageProblem`
    naming the file for anything that cannot be repaired.
    """
    path = Path(path)
    repairs: list[str] = []
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise ImageProblem(f"{path}: image file not found") from None
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"{path}: refused as too large by PIL ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ImageProblem(f"{path}: not a readable image ({error})") from None
    with image:
        width, height = image.size
        suffix = path.suffix.lower()
        expected_format = _FORMAT_OF_SUFFIX.get(suffix)
        if expected_format is not None and image.format != expected_format:
            repairs.append(f"{(image.format or 'unknown').lower()}_named_{suffix[1:]}")
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            repairs.append("exif_orientation_ignored")
        if image.mode != "RGB" and image.mode not in _CONVERTIBLE_MODES:
            raise ImageProblem(f"{path}: pixel mode {image.mode!r} (16-bit or float) is not supported; "
                               f"convert the file to 8-bit RGB")
        target = _stored_size(width, height, max_resolution)
        if target is None and max(width, height) > MAX_STORED_SIDE:
            raise ImageProblem(f"{path}: {width}x{height} exceeds FFCV's largest side {MAX_STORED_SIDE}; "
                               f"set a max resolution")
        if target is not None and image.format == "JPEG":
            image.draft(image.mode, target)  # decode at 1/2, 1/4 or 1/8 scale while still >= target
        try:
            image.load()
        except OSError as error:
            if not allow_truncated:
                raise ImageProblem(f"{path}: truncated or corrupt image ({error}); allow_truncated "
                                   f"(--allow-truncated) fills the missing part with grey") from None
            image = _load_truncated(path)
            repairs.append("truncated_filled")
        if image.mode != "RGB":
            repairs.append(f"converted_from_{image.mode}")
            image = image.convert("RGB")
        if target is not None:
            image = image.resize(target, Image.Resampling.BILINEAR)
            repairs.append("downscaled")
        pixels = np.array(image, dtype=np.uint8)
    return pixels, repairs, (width, height)


def _stored_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int] | None:
    """(width, height) to store, or None when the image is kept as is."""
    if max_resolution is None or max(width, height) <= max_resolution:
        return None
    scale = max_resolution / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load_truncated(path: Path):
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        image = Image.open(path)
        image.load()
        return image
    except OSError as error:
        raise ImageProblem(f"{path}: corrupt image, not repairable by filling ({error})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
