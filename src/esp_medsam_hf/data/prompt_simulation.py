"""Prompts simulated from a ground-truth mask, the one place both the evaluation (``data.interactive``,
``data.baselines``) and prompted training (``training.prompts``) take them from: one box per 8-connected object,
and a click at the centre of the largest error region of a prediction."""

from __future__ import annotations

import numpy as np

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def component_boxes(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 boxes (inclusive pixel indices) of the 8-connected components of ``mask``, ``margin``
    pixels wider, inside the image."""
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    boxes = []
    height, width = mask.shape
    for rows, cols in ndimage.find_objects(labels):
        boxes.append([max(cols.start - margin, 0), max(rows.start - margin, 0),
                      min(cols.stop - 1 + margin, width - 1), min(rows.stop - 1 + margin, height - 1)])
    return np.asarray(boxes, dtype=np.float32).reshape(count, 4)


def click_at_largest_error(prediction: np.ndarray, reference: np.ndarray) -> tuple[int, int, int] | None:
    """(x, y, label) of the next simulated click: the point of the largest 8-connected error region farthest from
    its border (its centre, as interactive-segmentation benchmarks place clicks), labelled 1 if the region is
    missed (in the reference, not the prediction) and 0 if extra; ``None`` when the prediction is exact."""
    from scipy import ndimage

    best: tuple[int, np.ndarray, int] | None = None
    for label, error in ((1, reference & ~prediction), (0, prediction & ~reference)):
        regions, count = ndimage.label(error, structure=EIGHT_CONNECTED)
        if count == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        largest = int(sizes.argmax())
        if best is None or sizes[largest] > best[0]:
            best = (int(sizes[largest]), regions == largest + 1, label)
    if best is None:
        return None
    distance = ndimage.distance_transform_edt(np.pad(best[1], 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return int(x), int(y), best[2]


__all__ = ["component_boxes", "click_at_largest_error"]
