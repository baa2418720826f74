"""Image processor of ESP-MedSAM: resize to the model size, intensity and colour normalisation, and mask
post-processing.

By default the image keeps its aspect ratio: its longest side is resized to the model size and the rest is padded
with zeros after normalisation (SAM's and LiteMedSAM's convention), so a 210x576 frame is not squashed 2.7:1.
``keep_aspect_ratio=False`` resizes to the square without padding, as the official release (trained on images stored
already resized to a square, the ``image_1024`` layout) does; ``EspMedSamImageProcessor.official()`` uses it.

16-bit, float and bool images are brought to uint8 with ``image_intensity.stretch_to_uint8`` and the processor's
``intensity_percentiles`` (StarDist's and cellpose's percentile normalisation, 1-99.8 % by default; ``None``: a
min-max stretch); the same function reads files for the pipelines and prepares the training data.

The processor also keeps the model's inference defaults (``inference_scale``, ``tile_size``, ``tile_overlap``,
``object_size``, and per modality the object size, mask threshold, long side and smallest body kept), saved in
``preprocessor_config.json``; ``prediction.predict`` reads them (see
``prediction.tiling_options``); preprocessing does not use them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)

from .dicom_plugin import register as register_dicom_plugin
from .image_intensity import DEFAULT_PERCENTILES, stretch_to_uint8


def _channels_first(image: ImageInput) -> ImageInput:
    """A numpy H x W x C array (C in 1, 3, 4) as a C x H x W tensor, so that an image 1, 3 or 4 pixels tall is not
    taken for channels-first (transformers guesses channels-first whenever the first axis could be channels)."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
    return image


def fit_size(height: int, width: int, size: tuple[int, int], keep_aspect_ratio: bool = True) -> tuple[int, int]:
    """The (height, width) an image of ``height`` x ``width`` is resized to inside ``size``: the largest size with the
    same aspect ratio that fits (each side at least 1 px), or ``size`` itself when not ``keep_aspect_ratio``."""
    if not keep_aspect_ratio:
        return int(size[0]), int(size[1])
    factor = min(size[0] / height, size[1] / width)
    return max(1, min(int(size[0]), round(height * factor))), max(1, min(int(size[1]), round(width * factor)))


class EspMedSamImageProcessorKwargs(ImagesKwargs, total=False):
    """The processor's own options beside transformers' ``ImagesKwargs`` (all saved in preprocessor_config.json).

    keep_aspect_ratio: resize the longest side to ``size`` and pad (True), or resize to the square (False).
    intensity_percentiles: (low, high) percentiles stretched to 0..255 for 16-bit/float images; None: min-max.
    inference_scale: ``prediction.predict``'s default scale: "auto", "whole", a zoom factor or "<size>px".
    tile_size: side of the tiles of tiled inference, in pixels of the rescaled image (None: the model size).
    tile_overlap: overlap of neighbouring tiles in pixels (None: an eighth of the tile).
    object_size: the object size (px across in the model's input) that "auto" and "<size>px" scales aim for.
    modality_object_sizes: ``{modality name: size}`` replacing ``object_size`` for those modalities (what stage 3
        measured best on a modality's validation images); None: ``object_size`` for every modality.
    modality_mask_thresholds: ``{modality name: logit}``: ``prediction.predict`` keeps a modality's mask logits
        above its threshold (stage 3 measures it on the validation images); 0 (probability 0.5) for the others.
    modality_long_sides: ``{modality name: pixels}``: "auto" tiles an image of those modalities with its longest
        side resized to this (what stage 3 sets for a modality trained on native-resolution crops).
    modality_min_object_fractions: ``{modality name: fraction}``: ``prediction.predict`` removes from a mask of
        those modalities each body narrower than this fraction of the image's typical object width (micronuclei
        beside nuclei; stage 3 sets a third for a modality whose object size it calibrates); None: none removed.
    """

    keep_aspect_ratio: bool
    intensity_percentiles: list[float] | tuple[float, float] | None
    inference_scale: str | float | int
    tile_size: int | None
    tile_overlap: int | None
    object_size: float | int
    modality_object_sizes: dict[str, float] | None
    modality_mask_thresholds: dict[str, float] | None
    modality_long_sides: dict[str, int] | None
    modality_min_object_fractions: dict[str, float] | None


def _to_supported_dtype(
    image: ImageInput, index: int | None = None, percentiles: tuple[float, float] | None = DEFAULT_PERCENTILES
) -> ImageInput:
    """Bring 16-bit, float and bool images to uint8 with ``image_intensity.stretch_to_uint8`` (a per-image
    percentile stretch, or min-max with ``percentiles=None``; NaN and inf repaired with a warning); uint8 passes
    through untouched.

    2-D arrays gain a trailing channel axis (transformers reads a bare 2-D array as ambiguous).

    torchvision resizes only uint8 and float images, and a 12-16 bit medical image would otherwise be read as
    0..65535 "pixels" against a 0..255 normalisation.
    """
    array = None
    if isinstance(image, np.ndarray):
        array = image
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif getattr(image, "mode", None) in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image)
    if array is None:
        return image
    if array.dtype == np.uint8:
        return array[..., None] if array.ndim == 2 else image
    result = stretch_to_uint8(array, "image" if index is None else f"image {index}", percentiles)
    if isinstance(image, torch.Tensor):  # a tensor keeps its own (channels-first) layout
        return torch.from_numpy(result[None] if result.ndim == 2 else result)
    return result[..., None] if result.ndim == 2 else result


class EspMedSamImageProcessor(TorchvisionBackend):
    r"""Resizes images into ``size`` (bilinear; aspect kept and zero-padded unless ``keep_aspect_ratio=False``),
    rescales and normalises them; post-processes mask logits. Its options: ``EspMedSamImageProcessorKwargs``.

    Defaults (rescale by 1/255, ImageNet mean and std, 1024 px) suit models trained by this package. Converted
    official checkpoints use the official preprocessing instead: no rescale, mean = std = (123.675, 116.28, 103.53)
    (``EspMedSamImageProcessor.official()``).

    Outputs: ``pixel_values`` (B, 3, S, S), ``original_sizes`` (B, 2) as (height, width), and ``labels`` (B, 1, S, S)
    binary float masks when ``segmentation_maps`` are given (resized and padded as the images). With
    ``do_pad=False`` and ``return_tensors=None`` an aspect-kept image stays at its resized size (tiled inference).
    """

    valid_kwargs = EspMedSamImageProcessorKwargs

    model_input_names = ["pixel_values", "original_sizes"]
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 1024, "width": 1024}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_pad = True
    keep_aspect_ratio = True
    intensity_percentiles = list(DEFAULT_PERCENTILES)
    inference_scale = "auto"
    tile_size = None
    tile_overlap = None
    object_size = 16.0
    modality_object_sizes = None
    modality_mask_thresholds = None
    modality_long_sides = None
    modality_min_object_fractions = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Pillow then reads DICOM files by content, so the stock pipeline's load_image(path) (Pillow) gets the
        # windowed pixels, with the package or as remote code. Done when a processor is built, never at import.
        register_dicom_plugin()

    @classmethod
    def official(cls, image_size: int = 1024) -> "EspMedSamImageProcessor":
        """The official release's preprocessing: no rescale, and the std equal to the mean (an upstream bug)."""
        mean = [123.675, 116.28, 103.53]
        return cls(size={"height": image_size, "width": image_size}, do_rescale=False, image_mean=mean, image_std=mean,
                   keep_aspect_ratio=False, inference_scale="whole")

    def preprocess(self, images: ImageInput, segmentation_maps: ImageInput | None = None, **kwargs) -> BatchFeature:
        r"""
        segmentation_maps: binary masks (any non-zero value is foreground), one per image, at the image's size.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def resize(self, image: torch.Tensor, size: SizeDict, resample=None, **kwargs) -> torch.Tensor:
        """Resize to (size.height, size.width); an image already at that size is returned untouched."""
        if tuple(image.shape[-2:]) == (size.height, size.width):
            return image
        return super().resize(image, size, resample=resample, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | None,
        return_tensors=None,
        device=None,
        **kwargs,
    ) -> BatchFeature:
        percentiles = kwargs.get("intensity_percentiles")
        if isinstance(images, (list, tuple)):
            images = [_to_supported_dtype(image, index, percentiles) for index, image in enumerate(images)]
        else:
            images = _to_supported_dtype(images, None, percentiles)
        if input_data_format is None:  # numpy arrays are H x W x C (as PIL and esp_medsam_hf.models.esp_medsam.image_reading give them)
            images = [_channels_first(i) for i in images] if isinstance(images, list) else _channels_first(images)
        images = self._prepare_images_structure(images)
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device
        )
        # as many channels as image_mean has values (3, RGB, by default; a model built for other channels works)
        mean = kwargs.get("image_mean")
        channels = len(mean) if isinstance(mean, (list, tuple)) else 3
        for index, image in enumerate(images):
            if image.shape[0] != channels:
                raise ValueError(
                    f"image {index} has {image.shape[0]} channels after conversion; expected {channels} (as many as "
                    "image_mean has values; 3 for RGB). Pass do_convert_rgb=True for greyscale or RGBA images."
                )
        original_sizes = [list(image.shape[-2:]) for image in images]
        data = dict(self._preprocess(images, return_tensors=None, **kwargs))
        data["original_sizes"] = original_sizes
        if segmentation_maps is not None:
            data["labels"] = self._preprocess_masks(
                segmentation_maps, original_sizes, kwargs["size"], kwargs["keep_aspect_ratio"], kwargs["do_pad"]
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(
        self, images: list[torch.Tensor], do_resize: bool, size: SizeDict, resample, do_rescale: bool,
        rescale_factor: float, do_normalize: bool, image_mean, image_std, do_pad: bool | None,
        keep_aspect_ratio: bool | None = None, return_tensors=None, **kwargs,
    ) -> BatchFeature:
        """Resize each image into ``size`` (aspect kept when ``keep_aspect_ratio``), rescale and normalise, then pad
        with zeros to ``size`` at the bottom and right (``do_pad``)."""
        processed = []
        for image in images:
            if do_resize:
                height, width = fit_size(*image.shape[-2:], (size.height, size.width), bool(keep_aspect_ratio))
                image = self.resize(image[None], SizeDict(height=height, width=width), resample=resample)[0]
            image = self.rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            if do_pad and do_resize and tuple(image.shape[-2:]) != (size.height, size.width):
                image = F.pad(image, (0, size.width - image.shape[-1], 0, size.height - image.shape[-2]))
            processed.append(image)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def _preprocess_masks(
        self, segmentation_maps: ImageInput, original_sizes: list[list[int]], size: SizeDict,
        keep_aspect_ratio: bool = False, do_pad: bool = True,
    ) -> list[torch.Tensor]:
        masks = self._prepare_images_structure(segmentation_maps, expected_ndims=2)
        if len(masks) != len(original_sizes):
            raise ValueError(f"got {len(masks)} segmentation maps for {len(original_sizes)} images")
        labels = []
        for index, (mask, original) in enumerate(zip(masks, original_sizes)):
            tensor = torch.as_tensor(np.asarray(mask))
            if tensor.dim() == 3:
                tensor = tensor[..., 0] if tensor.shape[-1] in (1, 3, 4) else tensor[0]
            if list(tensor.shape) != original:
                raise ValueError(
                    f"segmentation map {index} has size {list(tensor.shape)} but its image has {original}"
                )
            binary = (tensor > 0).float()[None, None]
            fitted = fit_size(*original, (size.height, size.width), keep_aspect_ratio)
            label = self._resize_mask(binary, fitted)[0]
            if do_pad and fitted != (size.height, size.width):
                label = F.pad(label, (0, size.width - fitted[1], 0, size.height - fitted[0]))
            labels.append(label)
        return labels

    @staticmethod
    def _resize_mask(binary: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A (1, 1, H, W) 0/1 mask at ``size``: the share of foreground under each new pixel, resampled like the image
        (bilinear, antialiased, pixel centres aligned), kept where it is at least half. Nearest sampling would take
        each new pixel from one corner of its footprint: labels shifted by up to half a new pixel against the
        image, thin structures dropped (a 4x reduction of mnfinder's masks and back keeps 95.8 % Dice that way,
        97.0 % this way)."""
        resized = F.interpolate(binary, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (resized >= 0.5).to(binary.dtype)

    def resized_sizes(self, original_sizes: torch.Tensor | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """The (height, width) each image of ``original_sizes`` (height, width) has inside the model input: aspect
        kept (the rest padded at the bottom and right) or the square (``keep_aspect_ratio=False``)."""
        if isinstance(original_sizes, torch.Tensor):
            original_sizes = original_sizes.tolist()
        model_size = SizeDict(**self.size) if isinstance(self.size, dict) else self.size
        size = (model_size.height, model_size.width)
        return [fit_size(int(h), int(w), size, bool(self.keep_aspect_ratio)) for h, w in original_sizes]

    def post_process_masks(
        self,
        masks: torch.Tensor,
        original_sizes: torch.Tensor | list,
        reshaped_input_sizes: torch.Tensor | list | None = None,
        mask_threshold: float = 0.0,
        binarize: bool = True,
        return_probabilities: bool = False,
    ) -> list[torch.Tensor]:
        """Low-resolution mask logits (B, 1, h, w) -> one (H, W) mask per image at its original size; prompted
        logits (B, N, K, h, w) -> one (N, K, H, W) tensor per image, as ``SamProcessor.post_process_masks`` gives.

        SAM's conventions (``SamImageProcessor.post_process_masks``): the logits are upsampled bilinearly to the
        model input size (as the official forward does), cropped to ``reshaped_input_sizes`` (the resized image
        inside the input), then
        upsampled to ``original_sizes``. With ``keep_aspect_ratio`` the default ``reshaped_input_sizes`` are the
        aspect-kept sizes :func:`fit_size` gives for ``original_sizes``, so the padding is cropped. ``binarize`` keeps ``logits > mask_threshold`` (0.0: probability 0.5,
        the official threshold); otherwise the logits are returned, or their sigmoid with ``return_probabilities``.
        """
        if isinstance(original_sizes, torch.Tensor):
            original_sizes = original_sizes.tolist()
        if len(original_sizes) != masks.shape[0]:
            raise ValueError(f"got {len(original_sizes)} original sizes for {masks.shape[0]} masks")
        model_size = SizeDict(**self.size) if isinstance(self.size, dict) else self.size
        size = (model_size.height, model_size.width)
        if reshaped_input_sizes is None:
            reshaped_input_sizes = self.resized_sizes(original_sizes)
        elif isinstance(reshaped_input_sizes, torch.Tensor):
            reshaped_input_sizes = reshaped_input_sizes.tolist()
        if len(reshaped_input_sizes) != masks.shape[0]:
            raise ValueError(f"got {len(reshaped_input_sizes)} reshaped input sizes for {masks.shape[0]} masks")
        prompted = masks.dim() == 5
        if masks.dim() not in (4, 5):
            raise ValueError(f"masks must be (B, 1, h, w) or prompted (B, N, K, h, w) logits, got {tuple(masks.shape)}")
        inner = masks.shape[1:-2]
        logits = F.interpolate(masks.float().flatten(1, -3), size=size, mode="bilinear", align_corners=False)
        results = []
        for index, ((height, width), (input_height, input_width)) in enumerate(
            zip(original_sizes, reshaped_input_sizes)
        ):
            if not (0 < int(input_height) <= size[0] and 0 < int(input_width) <= size[1]):
                raise ValueError(
                    f"reshaped_input_sizes[{index}] = ({input_height}, {input_width}) must lie within the model "
                    f"input size {size}"
                )
            mask = logits[index : index + 1, :, : int(input_height), : int(input_width)]
            if (int(height), int(width)) != tuple(mask.shape[-2:]):
                mask = F.interpolate(mask, size=(int(height), int(width)), mode="bilinear", align_corners=False)
            mask = mask[0].view(*inner, *mask.shape[-2:]) if prompted else mask[0, 0]
            if binarize:
                results.append(mask > mask_threshold)
            else:
                results.append(torch.sigmoid(mask) if return_probabilities else mask)
        return results

    def post_process_instance_segmentation(
        self,
        outputs,
        threshold: float | None = None,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        target_sizes=None,
    ) -> list[dict]:
        """One segment per image for transformers' image-segmentation pipeline: the target of its modality.

        Returns ``{"segmentation": (H, W) long tensor, 1 inside the mask, "segments_info": [{"id": 1, "label_id":
        modality + 1, "score": ...}]}`` per image. The score is the classifier's probability of the modality times
        the mean mask probability inside the mask (Mask2Former's convention; 0 for an empty mask).
        As in transformers' Mask2Former post-processing, a segment scoring below ``threshold`` (the pipeline's
        ``threshold=``, 0.9 by default there; ``None`` keeps every segment) is left out and its pixels stay 0.
        ``mask_threshold`` is a probability; ``overlap_mask_area_threshold`` does not apply (one target per image).
        """
        pred_masks, modality = outputs["pred_masks"], outputs["modality"]
        if target_sizes is None:
            target_sizes = [pred_masks.shape[-2:]] * pred_masks.shape[0]
        probabilities = self.post_process_masks(
            pred_masks, [list(s) for s in target_sizes], binarize=False, return_probabilities=True
        )
        label_probability = outputs["modality_logits"].float().softmax(-1).gather(1, modality.view(-1, 1))[:, 0]
        results = []
        for probs, index, p in zip(probabilities, modality.tolist(), label_probability.tolist()):
            mask = probs >= mask_threshold
            score = p * (float(probs[mask].mean()) if bool(mask.any()) else 0.0)
            if threshold is not None and score < threshold:
                results.append({"segmentation": torch.zeros_like(mask, dtype=torch.long), "segments_info": []})
            else:
                results.append(
                    {"segmentation": mask.long(), "segments_info": [{"id": 1, "label_id": index + 1, "score": score}]}
                )
        return results

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, threshold: float = 0.5, return_segmentation_scores: bool = False
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """Label maps for transformers' image-segmentation pipeline: 0 background, modality index + 1 foreground.

        The labels match ``config.id2label`` (0: "background", m + 1: the target of modality m). With
        ``return_segmentation_scores``, one ``SemanticSegmentationPostProcessorOutput`` per image whose
        ``segmentation_scores`` (num_labels, H, W) hold the per-label probabilities: 1 - p for the background, p
        for the image's modality target, 0 for the other targets (each image has one target).
        """
        pred_masks = outputs["pred_masks"]
        modality = outputs["modality"]
        if target_sizes is None:
            target_sizes = [pred_masks.shape[-2:]] * pred_masks.shape[0]
        elif len(target_sizes) != pred_masks.shape[0]:
            raise ValueError(f"target_sizes has {len(target_sizes)} sizes for {pred_masks.shape[0]} images")
        probabilities = self.post_process_masks(
            pred_masks, [list(s) for s in target_sizes], binarize=False, return_probabilities=True
        )
        labels = [(probs >= threshold).long() * (int(m) + 1) for probs, m in zip(probabilities, modality)]
        if not return_segmentation_scores:
            return labels
        # background + one target per modality (the teacher has no classifier logits: up to the largest index here)
        logits = outputs.get("modality_logits")
        num_labels = logits.shape[-1] + 1 if logits is not None else int(modality.max()) + 2
        results = []
        for label_map, probs, m in zip(labels, probabilities, modality.tolist()):
            scores = probs.new_zeros((num_labels, *probs.shape))
            scores[0], scores[m + 1] = 1 - probs, probs
            results.append(
                SemanticSegmentationPostProcessorOutput(data={"segmentation": label_map, "segmentation_scores": scores})
            )
        return results


__all__ = ["EspMedSamImageProcessor", "EspMedSamImageProcessorKwargs", "fit_size"]
