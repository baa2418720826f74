"""Pictures of data and predictions: mask overlays and a contact sheet of the 12 domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..fileio import atomic_file
from .domains import DOMAIN_NAMES, get_domain

GROUND_TRUTH_COLOUR = (0, 255, 0)
PREDICTION_COLOUR = (255, 0, 255)


def _outline(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay(
    image: np.ndarray, mask: np.ndarray | None = None, prediction: np.ndarray | None = None, alpha: float = 0.35
) -> np.ndarray:
    """An RGB uint8 picture: ground truth tinted green with a green outline, prediction as a magenta outline."""
    picture = np.asarray(image, dtype=np.float32).copy()
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    picture = picture[..., :3]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        colour = np.array(GROUND_TRUTH_COLOUR, dtype=np.float32)
        picture[mask] = (1 - alpha) * picture[mask] + alpha * colour
        picture[_outline(mask)] = colour
    if prediction is not None:
        picture[_outline(np.asarray(prediction, dtype=bool))] = np.array(PREDICTION_COLOUR, dtype=np.float32)
    return np.clip(picture, 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically."""
    path = Path(path)
    with atomic_file(path) as temporary:
        Image.fromarray(array).save(temporary, format="PNG")
    return path


def contact_sheet(examples: dict[str, tuple[np.ndarray, np.ndarray]], tile: int = 160, title: str = "") -> np.ndarray:
    """One row per pair of domains: image and overlay side by side, labelled ``domain (modality, role)``."""
    names = [name for name in DOMAIN_NAMES if name in examples]
    columns = 4
    rows = (len(names) * 2 + columns - 1) // columns
    label_height, header = 14, 18 if title else 0
    sheet = Image.new("RGB", (columns * tile, header + rows * (tile + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    for position, name in enumerate(names):
        image, mask = examples[name]
        spec = get_domain(name)
        for offset, picture in enumerate((image, overlay(image, mask))):
            cell = position * 2 + offset
            x, y = (cell % columns) * tile, header + (cell // columns) * (tile + label_height)
            sheet.paste(Image.fromarray(picture).resize((tile, tile), Image.NEAREST), (x, y + label_height))
            label = f"{name} ({spec.modality}, {spec.role})" if offset == 0 else f"{name} + mask"
            draw.text((x + 2, y + 1), label, fill=(0, 0, 0))
    return np.asarray(sheet)


def synthetic_contact_sheet(path: str | Path, *, seed: int = 0, size: int = 128, index: int = 0) -> Path:
    """Render one SYNTHETIC example per domain (image and mask overlay) into a PNG at ``path``."""
    from .synthetic import synthetic_example

    examples = {name: synthetic_example(name, index, seed=seed, size=size) for name in DOMAIN_NAMES}
    title = f"SYNTHETIC data, seed {seed}, {size}x{size} px (green: target mask)"
    return save_png(contact_sheet(examples, title=title), path)
