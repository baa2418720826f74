"""Object sizes in a binary mask, measured by the mask itself: each connected body's width (the diameter of its
largest inscribed disc: a nucleus' diameter, a vessel's calibre) and the image's typical width, which "auto"
inference rescales by (``prediction.choose_scale``) and against which a body too small to be an object of its own
is removed (``prediction.predict`` with the image processor's ``modality_min_object_fractions``). Ships with saved
models as remote code."""

from __future__ import annotations

import math

import numpy as np


def object_widths(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, widths, areas) of a binary mask's connected components (4-connected, scipy's default): the label
    image (0 background), and per component (index ``label - 1``) the diameter of its largest inscribed disc (twice
    its peak distance to the background) and its pixel count."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(mask, dtype=bool))
    distance = ndimage.distance_transform_edt(labels > 0)
    # Each component's peak distance by an unbuffered maximum per label: the same values as ndimage.maximum, which
    # sorts every pixel by label first (0.43 s against 0.03 s on a 2048-px mask of 20,000 components).
    peaks = np.zeros(count + 1, dtype=np.float64)
    np.maximum.at(peaks, labels.ravel(), distance.ravel())
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.float64)
    return labels, 2.0 * peaks[1:], areas


def _typical_width(widths: np.ndarray, areas: np.ndarray) -> float:
    """The area-weighted median of ``widths``."""
    order = np.argsort(widths)
    cumulative = np.cumsum(areas[order])
    return float(widths[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def estimate_object_size(mask: np.ndarray) -> tuple[float, int]:
    """(size, count) of a binary mask's objects: the area-weighted median of its connected components' widths
    (:func:`object_widths`). ``(nan, 0)`` for an empty mask."""
    _, widths, areas = object_widths(mask)
    if not len(widths):
        return math.nan, 0
    return _typical_width(widths, areas), len(widths)


def remove_small_bodies(mask: np.ndarray, fraction: float) -> np.ndarray:
    """``mask`` without the components narrower than ``fraction`` of its objects' size (:func:`estimate_object_size`)
    that do not touch the image's border (a body cut by the frame may be the edge of a whole object): in a nucleus
    mask, micronuclei and debris (``prediction``'s docstring, "Small bodies"). ``fraction`` 0 keeps every component."""
    mask = np.asarray(mask, dtype=bool)
    if fraction <= 0:
        return mask
    labels, widths, areas = object_widths(mask)
    if not len(widths):
        return mask
    small = np.concatenate([[False], widths < fraction * _typical_width(widths, areas)])
    small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    return mask & ~small[labels]


__all__ = ["estimate_object_size", "object_widths", "remove_small_bodies"]
