"""Training data: the package's ``datasets`` (prepared folders or synthetic), natural photographs for distillation,
deterministic augmentation and the collator that runs the image processor.

Augmentation randomness comes from ``(seed, epoch, index)`` rather than a global generator, so an interrupted and
resumed run sees exactly the images an uninterrupted run sees (the batch order itself comes from accelerate's
seedable sampler).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..data import prepared
from ..data.schema import image_to_rgb, mask_to_bool
from ..models.esp_medsam.image_reading import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

# Natural photographs shipped inside scikit-image (skimage/data; CC0 / public domain, see its README.txt).
SKIMAGE_PHOTOGRAPHS = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
    "hubble_deep_field.jpg", "camera.png", "moon.png", "coins.png", "brick.png", "grass.png", "gravel.png",
)


class TrainingDataError(ValueError):
    """The training data is missing or unusable (names the folder, domain or split and what was expected)."""


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def load_domains(
    data: str,
    domains: list[str] | None,
    *,
    splits: Mapping[str, int],
    seed: int = 0,
    size: int = 128,
) -> dict:
    """``{domain: DatasetDict}`` from :func:`esp_medsam_hf.data.prepared.load_domains` (synthetic data or a folder
    written by ``esp-medsam prepare``, the loader evaluation uses too); a missing folder, domain or split raises
    ``TrainingDataError`` naming it."""
    try:
        return prepared.load_domains(data, domains, splits=splits, seed=seed, size=size)
    except prepared.PreparedDataError as error:
        raise TrainingDataError(str(error)) from error


def check_not_empty(datasets: Mapping, split: str) -> None:
    """Every domain must have images in ``split``; otherwise a ``TrainingDataError`` names the empty domain."""
    if not datasets:
        raise TrainingDataError("no training domains were given")
    for name, dataset in datasets.items():
        if split not in dataset or len(dataset[split]) == 0:
            raise TrainingDataError(f"domain {name!r} has no images in its {split!r} split; nothing to train on")


class SegmentationDataset(torch.utils.data.Dataset):
    """Rows of several domains' split as (image HxWx3 uint8, mask HxW bool, modality) with optional flips, or, with
    ``scale_augmentation`` (:class:`esp_medsam_hf.training.augment.ScaleAugmentation`), views of the native-resolution
    rows under random zoom and intensity changes. ``repeats``: ``{domain: N}``, that domain's rows N times (each
    a row of its own, so each draws its own crops: the zoom's ``crops``)."""

    def __init__(self, datasets: Mapping, split: str, *, augment: bool = False, seed: int = 0,
                 scale_augmentation=None, repeats: Mapping[str, int] | None = None):
        import datasets as hf_datasets

        repeats = repeats or {}
        parts = [part for name, dataset in datasets.items() for part in [dataset[split]] * repeats.get(name, 1)]
        self.rows = hf_datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.scale_augmentation = scale_augmentation if augment else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def modalities(self) -> list[int]:
        return list(self.rows["modality"])

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        image, mask = image_to_rgb(row["image"]), mask_to_bool(row["mask"])
        if self.scale_augmentation is not None:
            image, mask = self.scale_augmentation(image, mask, row["domain"], int(index),
                                                  _rng(self.seed, self.epoch, index))
        elif self.augment and _rng(self.seed, self.epoch, index).random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "modality": row["modality"]}

    def scaled_view(self, index: int, view: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(image, mask, modality) of view ``view`` of row ``index`` under the scale augmentation, drawn from
        (seed, index, view) whatever the epoch: the views a feature cache stores."""
        if self.scale_augmentation is None:
            raise ValueError("scaled_view needs a dataset with scale_augmentation (and augment=True)")
        row = self.rows[int(index)]
        image, mask = self.scale_augmentation(image_to_rgb(row["image"]), mask_to_bool(row["mask"]), row["domain"],
                                              int(index), _rng(self.seed, 1 << 20, index, view))
        return image, mask, int(row["modality"])


def skimage_photographs() -> list[Path]:
    """Paths of the natural photographs inside the installed scikit-image (no download)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [folder / name for name in SKIMAGE_PHOTOGRAPHS if (folder / name).is_file()]
    if not paths:
        raise TrainingDataError(f"no natural photographs found in {folder}; is scikit-image installed?")
    return paths


def load_natural_images(source: str | None) -> list[np.ndarray]:
    """RGB uint8 photographs from a folder, a ``save_to_disk`` dataset with an ``image`` column, or scikit-image."""
    from PIL import Image

    if source is None:
        return [image_to_rgb(Image.open(p)) for p in skimage_photographs()]
    root = Path(source)
    if not root.exists():
        raise TrainingDataError(f"natural image source {root} does not exist (a folder of images or a dataset)")
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        import datasets

        dataset = datasets.load_from_disk(str(root))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        if "image" not in dataset.column_names:
            raise TrainingDataError(f"{root}: the dataset has no 'image' column (columns: {dataset.column_names})")
        images = [image_to_rgb(image) for image in dataset["image"]]
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        images = [image_to_rgb(Image.open(p)) for p in files]
    if not images:
        raise TrainingDataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


class NaturalImageDataset(torch.utils.data.Dataset):
    """Random square crops (30-100 % of the shorter side, random flip) of photographs, ``repeats`` per image."""

    def __init__(self, images: list[np.ndarray], *, repeats: int = 1, seed: int = 0):
        if not images:
            raise TrainingDataError("no natural images to distil on")
        self.images, self.repeats, self.seed, self.epoch = images, max(1, repeats), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        image = self.images[index % len(self.images)]
        rng = _rng(self.seed, self.epoch, index)
        height, width = image.shape[:2]
        side = int(min(height, width) * rng.uniform(0.3, 1.0))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        crop = image[top : top + side, left : left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return {"image": np.ascontiguousarray(crop), "modality": -1}


class Collator:
    """Runs the image processor on a list of rows: ``pixel_values``, ``modality`` and (for masks) ``labels``."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [row["image"] for row in rows]
        masks = [row["mask"].astype(np.uint8) for row in rows] if "mask" in rows[0] else None
        inputs = self.image_processor(images, segmentation_maps=masks, return_tensors="pt")
        batch = {
            "pixel_values": inputs["pixel_values"],
            "modality": torch.tensor([int(row["modality"]) for row in rows], dtype=torch.long),
        }
        if masks is not None:
            batch["labels"] = inputs["labels"].float()
        return batch

