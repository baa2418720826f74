"""Dice and Hausdorff distance of binary 2-D masks, as the ESP-MedSAM paper reports them.

The Hausdorff distance follows MONAI's ``compute_hausdorff_distance`` (``include_background=False``, Euclidean,
symmetric): the edges of a mask are its pixels removed by a binary erosion with the 4-connected cross and a
background border (pixels on the image border are edges), and each direction's distances go from every edge pixel
of one mask to the nearest edge pixel of the other. ``hd`` is the maximum of the two directed maxima and ``hd95``
the maximum of the two directed 95th percentiles (linear interpolation, as ``torch.quantile``). MONAI is not
needed at run time: this module computes the same thing with scipy's KD-tree (what MONAI itself uses on CPU),
and the tests check it against MONAI.

Empty masks, per image, exactly as MONAI 1.6 returns them: if exactly one of prediction and reference is empty,
``hd`` is ``inf`` and ``hd95`` is ``nan``; if both are empty, both are ``nan``. Means over images
(:func:`mean_hausdorff`) use only the images where both masks are non-empty (the only ones where the distance is
defined) and count the others as ``undefined``.

Dice is ``2 |P & R| / (|P| + |R|)`` in %, and 100 when both masks are empty (MONAI's ``DiceMetric`` with
``ignore_empty=False`` gives the same: 1 when both are empty, 0 when only the reference is).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree


def _as_mask(array, name: str) -> np.ndarray:
    mask = np.asarray(array)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected an HxW mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False) if mask.dtype == bool else mask > 0


def as_masks(masks, name: str) -> list[np.ndarray] | None:
    """Boolean HxW arrays from a list of masks: bool, 0/1 or 0/255 arrays or tensors, or PIL images (a dataset's
    own ``mask`` column); ``None`` passes through (an ``evaluate`` call without that argument)."""
    if masks is None:
        return None
    return [_as_mask(mask, f"{name}[{index}]") for index, mask in enumerate(masks)]


def _pair(prediction, reference) -> tuple[np.ndarray, np.ndarray]:
    prediction, reference = _as_mask(prediction, "prediction"), _as_mask(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from reference shape {reference.shape}")
    return prediction, reference


def dice_score(prediction, reference, ignore=None) -> float:
    """Dice coefficient in % of two binary masks (non-zero = foreground); 100 if both are empty. ``ignore``: a mask
    of the same shape whose pixels count in neither (a don't-care region, such as bodies a dataset's masks leave
    out on purpose)."""
    prediction, reference = _pair(prediction, reference)
    if ignore is not None:
        ignore = _as_mask(ignore, "ignore")
        if ignore.shape != reference.shape:
            raise ValueError(f"ignore shape {ignore.shape} differs from reference shape {reference.shape}")
        prediction, reference = prediction & ~ignore, reference & ~ignore
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 100.0
    return 200.0 * int(np.logical_and(prediction, reference).sum()) / total


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Edge pixels of a binary mask: the mask minus its erosion (4-connected cross, background border)."""
    mask = _as_mask(mask, "mask")
    return mask & ~binary_erosion(mask, border_value=0)


def hausdorff_distance(prediction, reference) -> tuple[float, float]:
    """``(hd, hd95)`` in pixels between two binary masks, as MONAI's ``compute_hausdorff_distance``."""
    prediction, reference = _pair(prediction, reference)
    if not prediction.any() and not reference.any():
        return math.nan, math.nan
    if not prediction.any() or not reference.any():
        return math.inf, math.nan
    edges_p = np.argwhere(mask_edges(prediction)).astype(np.float64)
    edges_r = np.argwhere(mask_edges(reference)).astype(np.float64)
    forward = cKDTree(edges_r).query(edges_p, k=1)[0]
    backward = cKDTree(edges_p).query(edges_r, k=1)[0]
    hd = max(float(forward.max()), float(backward.max()))
    hd95 = max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95)))
    return hd, hd95


def mean_dice(per_image: list[float]) -> float:
    return float(np.mean(per_image)) if per_image else math.nan


def mean_hausdorff(per_image: list[float]) -> tuple[float, int]:
    """Mean over the finite values and the number of undefined (nan or inf) ones."""
    values = np.asarray(per_image, dtype=np.float64)
    finite = np.isfinite(values)
    return (float(values[finite].mean()) if finite.any() else math.nan), int((~finite).sum())
