"""Processor of ESP-MedSAM: the image processor plus the mapping of modality names to mask-query indices."""

from __future__ import annotations

import numbers

from collections.abc import Sequence

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .configuration_esp_medsam import MODALITY_NAMES, EspMedSamModalitiesMixin


class EspMedSamProcessor(EspMedSamModalitiesMixin, ProcessorMixin):
    r"""Wraps [`EspMedSamImageProcessor`] and turns modality names into the model's ``modality`` indices.

    ``processor(images, modality="x-ray")`` (one name or index for all images, or one per image) returns
    ``pixel_values``, ``original_sizes`` and ``modality``; ``segmentation_maps`` add ``labels``. Names are looked
    up as the configs do (``modality_index``, from ``EspMedSamModalitiesMixin``).
    """

    def __init__(self, image_processor=None, modality_names: Sequence[str] | None = None, **kwargs):
        self.modality_names = list(modality_names or MODALITY_NAMES)
        super().__init__(image_processor, **kwargs)

    def __call__(
        self,
        images=None,
        modality: int | str | Sequence[int | str] | torch.Tensor | None = None,
        segmentation_maps=None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        if images is None:
            raise ValueError("images are required")
        inputs = self.image_processor(images, segmentation_maps=segmentation_maps, return_tensors=return_tensors, **kwargs)
        if modality is not None:
            batch = len(inputs["original_sizes"])
            if isinstance(modality, torch.Tensor):
                modality = modality.tolist()
            if isinstance(modality, (str, numbers.Number)):  # one for every image (a float is refused below)
                modality = [modality] * batch
            if len(modality) != batch:
                raise ValueError(f"got {len(modality)} modalities for {batch} images")
            inputs["modality"] = torch.tensor([self.modality_index(m) for m in modality], dtype=torch.long)
        return inputs

    def post_process_masks(self, *args, **kwargs) -> list[torch.Tensor]:
        """See [`EspMedSamImageProcessor.post_process_masks`]."""
        return self.image_processor.post_process_masks(*args, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """As ``ProcessorMixin.save_pretrained``, without keeping the ``auto_map`` that saving as remote code sets
        on the processor in memory (``from_pretrained`` drops it, so a save/load round trip would differ)."""
        had_auto_map = "auto_map" in vars(self)
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            if not had_auto_map:
                vars(self).pop("auto_map", None)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.image_processor.model_input_names, "modality"]


__all__ = ["EspMedSamProcessor"]
