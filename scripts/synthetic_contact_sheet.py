"""A contact sheet of the SYNTHETIC data: one example per domain, image and mask overlay, in one PNG.

Usage: ``python scripts/synthetic_contact_sheet.py synthetic.png [--size 128] [--seed 0] [--index 0]``
(docs/data.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from esp_medsam_hf.data.domains import DOMAIN_NAMES, get_domain
from esp_medsam_hf.data.synthetic import synthetic_example
from esp_medsam_hf.drawing import overlay, save_png


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
    examples = {name: synthetic_example(name, index, seed=seed, size=size) for name in DOMAIN_NAMES}
    title = f"SYNTHETIC data, seed {seed}, {size}x{size} px (green: target mask)"
    return save_png(contact_sheet(examples, title=title), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the PNG to write")
    parser.add_argument("--size", type=int, default=128, help="image size of the synthetic examples (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0, help="which example of each domain")
    args = parser.parse_args(argv)
    print(synthetic_contact_sheet(args.output, seed=args.seed, size=args.size, index=args.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
