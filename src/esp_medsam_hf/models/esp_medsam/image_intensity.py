"""Normalising images for the model: any image to HxWx3 uint8 RGB, with the package's one intensity stretch.

``to_rgb_uint8`` turns any PIL image or array into HxWx3 uint8 RGB with ``stretch_to_uint8``, the package's one
intensity stretch (the image processor applies it to non-uint8 inputs too): the 1 and 99.8 percentiles of a 16-bit
or float image to 0 and 255 (``DEFAULT_PERCENTILES``, StarDist's and cellpose's convention for microscopy), or its
minimum and maximum with ``percentiles=None``.

Float images with NaN or infinite pixels are repaired (NaN and -inf to the lowest finite value, +inf to the
highest) with a warning naming the file (``repair_non_finite``); an image with no finite pixel is refused.

This module ships with saved models as remote code (the image processor and the image readers import it), so it
depends only on numpy and Pillow.
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_PERCENTILES: tuple[float, float] = (1.0, 99.8)
"""Percentiles of a 16-bit or float image stretched to 0 and 255: StarDist's ``normalize`` and cellpose's default
(1 and 99.8 %), so that a few hot pixels or a dark border do not compress the objects' contrast as a min-max does."""

def repair_non_finite(array: np.ndarray, source: str | os.PathLike = "image") -> np.ndarray:
    """Replace NaN and -inf by the lowest finite value and +inf by the highest, with a warning naming ``source``.

    Raises ``ValueError`` when no pixel is finite. Integer arrays pass through untouched.
    """
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return array
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise ValueError(f"{source}: no finite pixel (all NaN or infinite)")
    low, high = float(array[finite].min()), float(array[finite].max())
    bad = int((~finite).sum())
    logger.warning("%s: %d pixel(s) are NaN or infinite; set to the image's finite range [%g, %g]",
                   source, bad, low, high)
    return np.nan_to_num(array, nan=low, posinf=high, neginf=low)


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto 0..255 (rounded to nearest, clipped); an empty range gives 0."""
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((np.asarray(values, dtype=np.float64) - low) * scale + 0.5, 0, 255).astype(np.uint8)


def stretch_to_uint8(
    array: np.ndarray, source: str | os.PathLike = "image",
    percentiles: tuple[float, float] | list[float] | None = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Stretch of any numeric array to uint8: its ``percentiles`` (low, high) to 0 and 255, clipped outside, or its
    minimum and maximum with ``percentiles=None`` (uint8 passes through; bool becomes 0/255; a constant image
    becomes 0). NaN and infinite pixels are repaired first (``repair_non_finite``, warnings name ``source``).

    ``EspMedSamImageProcessor`` applies this to non-uint8 inputs, so loading a 16-bit file here and passing the raw
    array to the image processor give the same pixels.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    data = repair_non_finite(array.astype(np.float64), source)
    if percentiles is None:
        return scale_to_uint8(data, float(data.min()), float(data.max()))
    low, high = check_percentiles(percentiles)
    # inverted_cdf depends only on the distribution of values: a grey image and the same image repeated as RGB
    # (the processor's input) get the same bounds, which interpolating percentiles would not give
    bounds = np.percentile(data, [low, high], method="inverted_cdf")
    return scale_to_uint8(data, float(bounds[0]), float(bounds[1]))


def check_percentiles(percentiles) -> tuple[float, float]:
    """(low, high) from a pair of percentiles with 0 <= low < high <= 100, else a ``ValueError`` naming the argument."""
    try:
        low, high = (float(v) for v in percentiles)
    except (TypeError, ValueError):
        raise ValueError(f"intensity_percentiles must be two numbers (low, high), got {percentiles!r}") from None
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got ({low:g}, {high:g})")
    return low, high


def to_rgb_uint8(
    image: Image.Image | np.ndarray, percentiles: tuple[float, float] | list[float] | None = DEFAULT_PERCENTILES
) -> np.ndarray:
    """Any PIL image or HxW / HxWx{1,2,3,4} array -> HxWx3 uint8 RGB (alpha dropped, 16-bit/float stretched by
    :func:`stretch_to_uint8` with ``percentiles``)."""
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            array = np.asarray(image)
        else:
            # PIL's conversion resolves palettes, drops alpha, and handles 1-bit, CMYK and YCbCr.
            return np.array(image.convert("RGB"))
    else:
        array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey+alpha or RGBA: drop alpha
        array = array[..., : array.shape[-1] - 1]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise ValueError(f"expected an HxW or HxWxC (C in 1..4) image, got an array of shape {array.shape}")
    array = stretch_to_uint8(array, percentiles=percentiles)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array)


__all__ = ["DEFAULT_PERCENTILES", "check_percentiles", "repair_non_finite", "scale_to_uint8", "stretch_to_uint8",
           "to_rgb_uint8"]
