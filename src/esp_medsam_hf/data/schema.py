"""The one schema every ESP-MedSAM dataset of this package has (prepared, synthetic or the real embedded case).

Columns: ``image`` (RGB PNG), ``mask`` (single-channel PNG, binary with values 0 and 255: 255 is the target),
``modality`` (ClassLabel of the 6 modalities, index = official query index), ``domain`` (the domain's name: one of
the registered domains of :mod:`.domains` or a user's own) and ``file_name`` (the official file name, or ``synthetic_<domain>_<i>.png`` for synthetic rows).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Features, Image, Value
from PIL import Image as PILImage

from .domains import MODALITY_NAMES, Domain

MASK_FOREGROUND = 255
"""Pixel value of the target in stored masks (the background is 0)."""


def features() -> Features:
    """The ``datasets.Features`` of every dataset of this package."""
    return Features(
        {
            "image": Image(),
            "mask": Image(),
            "modality": ClassLabel(names=list(MODALITY_NAMES)),
            "domain": Value("string"),
            "file_name": Value("string"),
        }
    )


def encode_png(array: np.ndarray) -> dict[str, bytes | None]:
    """Encode a uint8 HxW or HxWx3 array as a PNG in the form ``datasets.Image`` stores."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"})
"""PNG chunks that hold text, EXIF or a timestamp (PatientName=..., a scanner's EXIF): never stored in a dataset
unless asked (``esp-medsam prepare --keep-metadata``)."""


def strip_png_metadata(data: bytes) -> bytes:
    """A PNG file's bytes without its ``METADATA_CHUNKS`` (pixels and every other chunk as they were)."""
    parts, position = [data[:8]], 8
    while position + 8 <= len(data):
        end = position + 12 + int.from_bytes(data[position:position + 4], "big")
        if data[position + 4:position + 8] not in METADATA_CHUNKS:
            parts.append(data[position:end])
        position = end
    return b"".join(parts)


def stored_png(path: Path, pixels: np.ndarray, mode: str, keep_metadata: bool = False
                ) -> dict[str, bytes | None] | None:
    """The file's own bytes when it already is what would be stored (an 8-bit PNG in ``mode``; for masks only the
    values 0 and 255), so that checked files are not re-encoded; None otherwise. Text, EXIF and time chunks are
    dropped (``strip_png_metadata``) unless ``keep_metadata``."""
    if path.suffix.lower() != ".png":
        return None
    with PILImage.open(path) as image:
        if image.format != "PNG" or image.mode != mode or "transparency" in image.info:
            return None
    if mode == "L":
        stored = np.asarray(PILImage.open(path))
        if not np.array_equal(stored > 0, pixels) or not np.isin(stored, (0, 255)).all():
            return None
    data = path.read_bytes()
    return {"bytes": data if keep_metadata else strip_png_metadata(data), "path": None}


def encode_mask(mask: np.ndarray) -> dict[str, bytes | None]:
    """Encode a boolean HxW mask as a 0/255 single-channel PNG."""
    return encode_png(np.where(np.asarray(mask, dtype=bool), MASK_FOREGROUND, 0).astype(np.uint8))


def mask_to_bool(mask: PILImage.Image | np.ndarray) -> np.ndarray:
    """A stored mask (PIL image or array, 0/255 or 0/1) as an HxW boolean array (foreground = value > 0)."""
    array = np.asarray(mask)
    if array.ndim == 3:
        array = array[..., 0]
    return array > 0


def image_to_rgb(image: PILImage.Image | np.ndarray) -> np.ndarray:
    """A stored image (PIL image or array) as an HxWx3 uint8 array."""
    if isinstance(image, PILImage.Image):
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3].astype(np.uint8)


def describe(dataset_dict, domain: Domain, synthetic: bool = False) -> None:
    """Set the description and citation of every split's ``DatasetInfo``."""
    if synthetic:
        description = (
            f"SYNTHETIC stand-in for the {domain.name} domain ({domain.modality}, target: {domain.target}, "
            f"{domain.role} domain): procedurally generated images, not real patient data."
        )
        citation = ""
    elif domain.is_official:
        description = (
            f"{domain.dataset}: {domain.modality} images with binary {domain.target} masks (0/255), "
            f"ESP-MedSAM {domain.role} domain '{domain.name}', official train/valid/test lists."
        )
        citation = domain.citation
    else:
        description = (
            f"{domain.dataset}: {domain.modality} images with binary {domain.target} masks (0/255), "
            f"{domain.origin} domain '{domain.name}'. {domain.description}"
        ).strip()
        citation = domain.citation
    for dataset in dataset_dict.values():
        dataset.info.description = description
        dataset.info.citation = citation
