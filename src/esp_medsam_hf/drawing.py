"""Pictures of masks for people: ``draw_mask`` (a mask tinted and outlined, through
``torchvision.utils.draw_segmentation_masks``), ``overlay`` (ground truth beside a prediction), ``draw_caption`` and
``save_png``. Not shipped with saved models: the command line, evaluation and the Space draw with it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .models.esp_medsam.fileio import atomic_file
from .models.esp_medsam.image_reading import to_rgb_uint8

GROUND_TRUTH_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 0, 255)


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of ``mask`` less than ``width`` pixels (4-connected) from its boundary; the image's edge is not
    a boundary."""
    mask = np.asarray(mask, dtype=bool)
    interior = mask
    for _ in range(width):
        padded = np.pad(interior, 1, mode="edge")
        interior = interior & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_mask(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], *, alpha: float = 0.4, outline_width: int = 1
) -> np.ndarray:
    """``image`` as HxWx3 uint8 with ``mask`` tinted towards ``colour`` by ``alpha`` (0: no tint) and its outline,
    ``outline_width`` pixels wide (0: none), in full colour. Pixels outside the mask are left as they are."""
    import torch
    from torchvision.utils import draw_segmentation_masks

    picture = torch.from_numpy(to_rgb_uint8(image).copy()).permute(2, 0, 1)
    region = torch.from_numpy(np.asarray(mask, dtype=bool))
    if alpha > 0:
        tinted = draw_segmentation_masks(picture, region, alpha=alpha, colors=colour)
        picture = torch.where(region, tinted, picture)  # the blend's float rounding may move pixels outside by 1
    if outline_width > 0:
        edge = torch.from_numpy(outline(region.numpy(), outline_width))
        picture = draw_segmentation_masks(picture, edge, alpha=1.0, colors=colour)
    return np.ascontiguousarray(picture.permute(1, 2, 0).numpy())


def overlay(
    image: np.ndarray, mask: np.ndarray | None = None, prediction: np.ndarray | None = None, alpha: float = 0.35
) -> np.ndarray:
    """An RGB uint8 picture: ground truth tinted green with a green outline, prediction as a magenta outline."""
    picture = to_rgb_uint8(image)
    if mask is not None:
        picture = draw_mask(picture, mask, GROUND_TRUTH_COLOUR, alpha=alpha)
    if prediction is not None:
        picture = draw_mask(picture, prediction, PREDICTION_COLOUR, alpha=0.0)
    return picture


def draw_caption(image: np.ndarray, caption: str) -> np.ndarray:
    """``image`` (HxWx3 uint8) with ``caption`` in white on black in the top-left corner, sized to the image."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(canvas.size) // 40))
    box = draw.textbbox((4, 4), caption, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a PNG atomically."""
    path = Path(path)
    with atomic_file(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")
    return path


__all__ = ["GROUND_TRUTH_COLOUR", "PREDICTION_COLOUR", "draw_caption", "draw_mask", "draw_prompts", "outline", "overlay", "save_png"]


def draw_prompts(
    picture: np.ndarray,
    points: list[tuple[float, float, int]],
    boxes: list[tuple[float, float, float, float]],
    corner: tuple[float, float] | None = None,
) -> np.ndarray:
    """A copy of ``picture`` (HxWx3 uint8) with clicks marked (green positive, red negative), box outlines and a
    pending box corner (blue): what the Space's click-to-correct shows."""
    picture = picture.copy()
    radius = max(2, round(max(picture.shape[:2]) / 150))
    height, width = picture.shape[:2]

    def dot(x: float, y: float, colour: tuple[int, int, int]) -> None:
        x, y = int(x), int(y)
        picture[max(y - radius, 0) : y + radius + 1, max(x - radius, 0) : x + radius + 1] = colour

    for x, y, label in points:
        dot(x, y, (0, 200, 0) if label == 1 else (230, 0, 0))
    for box in boxes:
        x0, y0, x1, y1 = (min(int(v), limit - 1) for v, limit in zip(box, (width, height, width, height)))
        for rows, cols in (((y0, y0 + 1), (x0, x1 + 1)), ((y1, y1 + 1), (x0, x1 + 1)),
                           ((y0, y1 + 1), (x0, x0 + 1)), ((y0, y1 + 1), (x1, x1 + 1))):
            picture[rows[0] : rows[1], cols[0] : cols[1]] = (0, 120, 255)
    if corner is not None:
        dot(*corner, (0, 120, 255))
    return picture
