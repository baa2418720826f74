"""Processor of ESP-MedSAM: the image processor plus the mapping of modality names to mask-query indices."""

import numbers

from collections.abc import Sequence

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, Unpack

from .configuration_esp_medsam import MODALITY_NAMES, TARGET_NAMES, EspMedSamModalitiesMixin


def rescale_prompts(
    original_sizes,
    resized_sizes,
    input_points=None,
    input_labels=None,
    input_boxes=None,
    names: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """SAM-style prompts in original-image pixels, checked against ``original_sizes`` (B, 2; height, width) and
    rescaled to ``resized_sizes`` (B, 2), the (height, width) each image has inside the model input
    (``EspMedSamImageProcessor.resized_sizes``: x and y scale apart when the image is resized to the square). Returns ``input_points`` (B, N, P, 2), ``input_labels`` (B, N, P) and ``input_boxes`` (B, N, 4) for
    those given. ``names`` renames the arguments in error messages (the pipeline's ``points=``...)."""
    names = {"input_points": "input_points", "input_labels": "input_labels", "input_boxes": "input_boxes",
             **(names or {})}
    prompts: dict[str, torch.Tensor] = {}
    if (input_points is None) != (input_labels is None):
        raise ValueError(f"{names['input_points']} and {names['input_labels']} go together: one label (1, 0 or -1 "
                         "padding) per point")
    sizes = torch.as_tensor(original_sizes, dtype=torch.float32).view(-1, 2)
    scale = torch.as_tensor(resized_sizes, dtype=torch.float32).view(-1, 2).flip(-1) / sizes.flip(-1)  # x, y
    if input_points is not None:
        points = _as_tensor(names["input_points"], input_points, torch.float32, 4, sizes.shape[0])
        labels = _as_tensor(names["input_labels"], input_labels, torch.long, 3, sizes.shape[0])
        if labels.shape != points.shape[:-1] or points.shape[-1] != 2:
            raise ValueError(f"{names['input_points']} must be (images, objects, points, 2) with "
                             f"{names['input_labels']} (images, objects, points), got {tuple(points.shape)} and "
                             f"{tuple(labels.shape)}")
        _check_inside(names["input_points"], points, sizes, labels != -1)
        prompts["input_points"] = points * scale[:, None, None]
        prompts["input_labels"] = labels
    if input_boxes is not None:
        boxes = _as_tensor(names["input_boxes"], input_boxes, torch.float32, 3, sizes.shape[0])
        if boxes.shape[-1] != 4:
            raise ValueError(f"{names['input_boxes']} must be (images, objects, 4), got {tuple(boxes.shape)}")
        corners = boxes.view(*boxes.shape[:2], 2, 2)
        _check_inside(names["input_boxes"], corners, sizes, None)
        prompts["input_boxes"] = (corners * scale[:, None, None]).view_as(boxes)
    return prompts


def _as_tensor(name: str, value, dtype: torch.dtype, dims: int, batch: int) -> torch.Tensor:
    """A nested list or tensor as a ``dims``-dimensional tensor with one entry per image."""
    try:
        tensor = torch.as_tensor(value, dtype=dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name} must be a rectangular nested list (pad points with label -1): {error}") from None
    if tensor.dim() != dims or tensor.shape[0] != batch:
        raise ValueError(f"{name} must have {dims} dimensions with one entry per image ({batch}), got "
                         f"shape {tuple(tensor.shape)}")
    return tensor


def _check_inside(name: str, coords: torch.Tensor, sizes: torch.Tensor, keep: torch.Tensor | None) -> None:
    """Refuse x/y coordinates (B, ..., 2) outside their image's (width, height)."""
    limits = sizes.flip(-1).view(-1, *([1] * (coords.dim() - 2)), 2)
    outside = ((coords < 0) | (coords > limits)).any(-1)
    if keep is not None:
        outside &= keep
    if bool(outside.any()):
        index = outside.nonzero()[0].tolist()
        image = index[0]
        raise ValueError(
            f"{name}{index} = {coords[tuple(index)].tolist()} lies outside image {image} "
            f"(width {int(sizes[image, 1])}, height {int(sizes[image, 0])} pixels); prompts are given in "
            "original-image pixels"
        )


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
    ``target="optic disc"`` (a name of ``target_names``, the model's ``config.all_target_names``, or an index; one
    for all images or one per image) returns ``target`` instead, which the model decodes (a target added to a
    modality). Other keyword arguments are the image processor's, flat or as ``images_kwargs={...}``
    (``EspMedSamProcessorKwargs``); an unknown one is ignored with transformers' warning.
    """

    valid_processor_kwargs = EspMedSamProcessorKwargs

    def __init__(self, image_processor=None, modality_names: Sequence[str] | None = None,
                 target_names: Sequence[str] | None = None, **kwargs):
        self.modality_names = list(modality_names or MODALITY_NAMES)
        official = self.modality_names == list(MODALITY_NAMES)
        self.target_names = list(target_names or (TARGET_NAMES if official else ()))
        super().__init__(image_processor, **kwargs)

    def target_index(self, target: int | str) -> int:
        """Index of ``target`` (a name of ``target_names`` or an index); ``ValueError`` names the choices."""
        if isinstance(target, str):
            if target not in self.target_names:
                raise ValueError(f"unknown target {target!r}; expected one of {self.target_names}")
            return self.target_names.index(target)
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
            raise ValueError(f"target must be a name ({', '.join(self.target_names)}) or an index, got {target!r}")
        return int(target)

    def __call__(
        self,
        images: ImageInput | None = None,
        modality: int | str | Sequence[int | str] | torch.Tensor | None = None,
        segmentation_maps: ImageInput | None = None,
        input_points: Sequence | torch.Tensor | None = None,
        input_labels: Sequence | torch.Tensor | None = None,
        input_boxes: Sequence | torch.Tensor | None = None,
        target: int | str | Sequence[int | str] | None = None,
        **kwargs: Unpack[EspMedSamProcessorKwargs],
    ) -> BatchFeature:
        r"""
        input_points / input_labels / input_boxes: optional prompts as ``SamProcessor`` takes them, in original-image
            pixels: points ``[image][object][point] = [x, y]`` with labels ``[image][object][point]`` (1 positive,
            0 negative, -1 padding), boxes ``[image][object] = [x0, y0, x1, y1]``. They are checked against each
            image's size and rescaled to the model input (the image is resized to a square, so x and y scale apart);
            returned as (B, N, P, 2), (B, N, P) and (B, N, 4) tensors.
        """
        if images is None:
            raise ValueError("images are required")
        if modality is not None and target is not None:
            raise ValueError("give modality= or target= (a target implies its modality), not both")
        output_kwargs = self._merge_kwargs(EspMedSamProcessorKwargs, **kwargs)
        inputs = self.image_processor(images, segmentation_maps=segmentation_maps, **output_kwargs["images_kwargs"])
        resized = self.image_processor.resized_sizes(inputs["original_sizes"])
        inputs.update(rescale_prompts(inputs["original_sizes"], resized, input_points, input_labels, input_boxes))
        batch = len(inputs["original_sizes"])
        for key, value, lookup in (("modality", modality, self.modality_index), ("target", target, self.target_index)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if isinstance(value, (str, numbers.Number)):  # one for every image (a float is refused below)
                value = [value] * batch
            if len(value) != batch:
                raise ValueError(f"got {len(value)} {'modalities' if key == 'modality' else 'targets'} for {batch} "
                                 "images")
            inputs[key] = torch.tensor([lookup(v) for v in value], dtype=torch.long)
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


__all__ = ["EspMedSamProcessor", "rescale_prompts"]
