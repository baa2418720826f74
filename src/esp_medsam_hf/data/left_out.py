"""What a model loses to bodies a dataset's masks leave out on purpose: mnfinder's nucleus masks leave out
micronuclei (the wheel marks them in masks of their own, ``real.mnfinder_micronuclei``), which look like small
nuclei and which the model marks.

Per magnification of the scale table (``scale_table.zoom_view``: x0.5 a 2x2 mosaic, x2 and x4 centre crops), the
mean Dice as the evaluation scores it, the mean Dice with the left-out bodies as don't care (grown by ``margin``
pixels, as a hand-drawn outline and the model's mask of the same body differ by a pixel or two), and the share of
the model's false-positive pixels that lie on them. The gap between the two Dice figures is what the model's
marking those bodies costs; the same gap at x1 and x4 tells how much of the drop from x1 to x4 they account for
(at x4 a crop of a quarter of the side holds one to four nuclei, and a few micronuclei are a large share of its
foreground).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..metrics.functional import dice_score, mean_dice
from ..models.esp_medsam.prediction import predict
from .scale_table import ZOOMS, zoom_view

logger = logging.getLogger(__name__)

MARGIN = 2
"""Pixels each left-out body is grown by before it counts as don't care."""


def left_out_scores(prediction: np.ndarray, reference: np.ndarray, left_out: np.ndarray) -> dict[str, float]:
    """One mask against its reference: Dice (%), Dice with ``left_out`` as don't care, the false-positive pixels
    and how many of them lie on ``left_out`` (all HxW bool; ``left_out`` already grown by the caller)."""
    false_positive = prediction & ~reference
    return {"dice": dice_score(prediction, reference), "dice_dont_care": dice_score(prediction, reference, left_out),
            "false_positive": int(false_positive.sum()), "false_positive_on": int((false_positive & left_out).sum())}


def grown(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` grown by ``margin`` pixels (8-connected dilation); unchanged for ``margin`` 0."""
    from scipy import ndimage

    if margin < 0:
        raise ValueError(f"margin must be >= 0 pixels, got {margin}")
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin) if margin else mask


def left_out_table(
    model, processor, pairs: Sequence[tuple[np.ndarray, np.ndarray]], left_out: Sequence[np.ndarray],
    modality: str, *, zooms: Iterable[float] = ZOOMS, margin: int = MARGIN, scale: Any = None,
    backend: str | None = "eager", progress: bool = False,
) -> list[dict]:
    """One row per zoom: ``{"zoom", "dice", "dice_dont_care", "false_positive_share", "per_image"}`` over
    ``pairs`` of (RGB image, bool mask) and their ``left_out`` masks, segmented through ``prediction.predict``
    at ``scale`` (``None``: the model's default) on ``backend``. Dice in % (means over the images,
    ``metrics.functional.mean_dice``); ``false_positive_share``: % of all false-positive pixels on left-out bodies
    (``None`` without false positives)."""
    from tqdm.auto import tqdm

    if len(left_out) != len(pairs):
        raise ValueError(f"left_out holds {len(left_out)} masks for {len(pairs)} images")
    zooms = list(zooms)
    rows = []
    with tqdm(total=len(zooms) * len(pairs), desc="left-out bodies", unit="view", disable=not progress) as bar:
        for zoom in zooms:
            per_image = []
            for (image, mask), bodies in zip(pairs, left_out):
                if bodies.shape != mask.shape:
                    raise ValueError(f"a left-out mask of shape {bodies.shape} beside a mask of shape {mask.shape}")
                view, reference = zoom_view(image, mask, zoom)
                prediction = predict(model, processor, [view], modality, backend=backend, scale=scale).masks[0]
                per_image.append(left_out_scores(prediction, reference, zoom_view(image, grown(bodies, margin),
                                                                                  zoom)[1]))
                bar.update()
            false_positive = sum(entry["false_positive"] for entry in per_image)
            on = sum(entry["false_positive_on"] for entry in per_image)
            rows.append({"zoom": zoom, "dice": mean_dice([e["dice"] for e in per_image]),
                         "dice_dont_care": mean_dice([e["dice_dont_care"] for e in per_image]),
                         "false_positive_share": 100.0 * on / false_positive if false_positive else None,
                         "per_image": per_image})
            logger.info("left-out bodies x%g: Dice %.2f%%, with them as don't care %.2f%%", zoom, rows[-1]["dice"],
                        rows[-1]["dice_dont_care"])
    return rows


def left_out_markdown(rows: Sequence[dict], margin: int = MARGIN) -> str:
    """:func:`left_out_table`'s rows as a Markdown table."""
    lines = ["| shown at | Dice % | Dice %, left-out bodies don't care | false positives on them % |",
             "| --- | ---: | ---: | ---: |"]
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines += [f"| x{row['zoom']:g} | {row['dice']:.2f} | {row['dice_dont_care']:.2f} | "
              f"{share(row['false_positive_share'])} |" for row in rows]
    return "\n".join(lines) + (f"\n\nLeft-out bodies grown by {margin} px. x0.5: a 2x2 mosaic of each image; x2, x4: "
                               "centre crops of 1/2 and 1/4 of the side.\n")


__all__ = ["MARGIN", "grown", "left_out_markdown", "left_out_scores", "left_out_table"]
