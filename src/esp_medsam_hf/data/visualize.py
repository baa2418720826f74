"""Pictures of the data: a contact sheet of the 12 domains (overlays are drawn by :mod:`esp_medsam_hf.drawing`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..drawing import overlay, save_png
from .domains import DOMAIN_NAMES, get_domain


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
