"""What a model loses to bodies a dataset's masks leave out on purpose: mnfinder's nucleus masks leave out
micronuclei (the wheel marks them in masks of their own, ``real.left_out_masks``), which look like small nuclei
and which the model marks.

The scale table (``scale_table.scale_table`` with ``left_out``) scores each of its views twice: as the evaluation
does, and with the left-out bodies as don't care (grown by ``MARGIN`` pixels, as a hand-drawn outline and the
model's mask of the same body differ by a pixel or two), beside the share of the model's false-positive pixels
that lie on them. The gap between the two Dice figures is what the model's marking those bodies costs; the same
gap at x1 and x4 tells how much of the drop from x1 to x4 they account for (at x4 a crop of a quarter of the side
holds one to four nuclei, and a few micronuclei are a large share of its foreground).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..metrics.functional import dice_score, mean_dice

MARGIN = 2
"""Pixels each left-out body is grown by before it counts as don't care."""


def grown(mask: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """``mask`` grown by ``margin`` pixels (8-connected dilation); unchanged for ``margin`` 0."""
    from scipy import ndimage

    if margin < 0:
        raise ValueError(f"margin must be >= 0 pixels, got {margin}")
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin) if margin else mask


def left_out_scores(prediction: np.ndarray, reference: np.ndarray, left_out: np.ndarray) -> dict[str, float]:
    """One mask against its reference: Dice (%), Dice with ``left_out`` as don't care, the false-positive pixels
    and how many of them lie on ``left_out`` (all HxW bool; ``left_out`` already grown by the caller)."""
    false_positive = prediction & ~reference
    return {"dice": dice_score(prediction, reference), "dice_dont_care": dice_score(prediction, reference, left_out),
            "false_positive": int(false_positive.sum()), "false_positive_on": int((false_positive & left_out).sum())}


def left_out_summary(scores: Sequence[dict]) -> dict[str, float | None]:
    """Over a view's images (:func:`left_out_scores` each): the mean Dice with the bodies as don't care
    (``metrics.functional.mean_dice``) and the % of all false-positive pixels on them (``None`` without any)."""
    false_positive = sum(entry["false_positive"] for entry in scores)
    on = sum(entry["false_positive_on"] for entry in scores)
    return {"dice_dont_care": mean_dice([entry["dice_dont_care"] for entry in scores]),
            "false_positive_share": 100.0 * on / false_positive if false_positive else None}


def left_out_markdown(rows: Sequence[dict], what: str, margin: int = MARGIN) -> str:
    """Scale-table rows scored with left-out bodies (``dice``, ``dice_dont_care``, ``false_positive_share``) as a
    Markdown table; ``what`` names the bodies."""
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [f"| shown at | Dice % | Dice %, {what} don't care | false-positive pixels on {what} % |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {row['label']} | {row['dice']:.2f} | {row['dice_dont_care']:.2f} | "
              f"{share(row['false_positive_share'])} |" for row in rows]
    return "\n".join(lines) + (f"\n\n{what.capitalize()} grown by {margin} px. x0.5: a 2x2 mosaic of each image; x2, "
                               "x4: centre crops of 1/2 and 1/4 of the side.\n")


__all__ = ["MARGIN", "grown", "left_out_markdown", "left_out_scores", "left_out_summary"]
