"""Processor of ESP-MedSAM: the image processor plus the mapping of modality names to mask-query indices."""

import numbers

from collections.abc import Sequence

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, Unpack

from .configuration_esp_medsam import MODALITY_NAMES, EspMedSamModalitiesMixin


class EspMedSamProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of ``EspMedSamProcessor.__call__``, merged by ``ProcessorMixin._merge_kwargs``: flat
    image-processor arguments or an ``images_kwargs`` dict, and ``return_tensors`` (default ``"pt"``). Prompt
    arguments go beside ``images_kwargs`` as further fields."""

    images_kwargs: ImagesKwargs
    _defaults = {"images_kwargs": {"return_tensors": "pt"}}


class EspMedSamProcessor(ProcessorMixin, EspMedSamModalitiesMixin):
    r"""Wraps [`EspMedSamImageProcessor`] and turns modality names into the model's ``modality`` indices.

    ``processor(images, modality="x-ray")`` (one name or index for all images, or one per image) returns
    ``pixel_values``, ``original_sizes`` and ``modality``; ``segmentation_maps`` add ``labels``. Names are looked
    up as the configs do (``modality_index``, from ``EspMedSamModalitiesMixin``). Without a modality the output
    has no ``modality`` (the model's classifier decides), so ``model_input_names`` are the image processor's.
    Other keyword arguments are the image processor's, flat or as ``images_kwargs={...}``
    (``EspMedSamProcessorKwargs``); an unknown one is ignored with transformers' warning.
    """

    valid_processor_kwargs = EspMedSamProcessorKwargs

    def __init__(self, image_processor=None, modality_names: Sequence[str] | None = None, **kwargs):
        self.modality_names = list(modality_names or MODALITY_NAMES)
        super().__init__(image_processor, **kwargs)

    def __call__(
        self,
        images: ImageInput | None = None,
        modality: int | str | Sequence[int | str] | torch.Tensor | None = None,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[EspMedSamProcessorKwargs],
    ) -> BatchFeature:
        if images is None:
            raise ValueError("images are required")
        output_kwargs = self._merge_kwargs(EspMedSamProcessorKwargs, **kwargs)
        inputs = self.image_processor(images, segmentation_maps=segmentation_maps, **output_kwargs["images_kwargs"])
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


__all__ = ["EspMedSamProcessor"]
