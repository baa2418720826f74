"""The "medical-image-segmentation" pipeline: ESP-MedSAM with a modality per call or per image, batched.

``pipeline("medical-image-segmentation", model=DIR, trust_remote_code=True)`` builds it from a folder saved with
``save_pretrained_with_pipeline`` (the class ships as remote code through ``config.json["custom_pipelines"]``);
with this package imported, ``pipeline(..., pipeline_class=EspMedSamSegmentationPipeline)`` works without remote code.

Each image gives one segment, in the image-segmentation pipeline's format plus the modality:
``[{"label": target, "score": s, "mask": PIL "L" (0/255, original size), "modality": name,
"modality_probability": p, "modality_source": "given" | "file" | "classifier"}]``.
The modality comes from, in order: the image's own ``{"image": ..., "modality": ...}`` or the per-image list
``modality=[...]``; the call's ``modality=``; the file (an unambiguous DICOM Modality tag, see ``image_reading.py``); the
model's modality classifier. ``modality_probability`` is the classifier's probability of the modality used;
``score`` = P(label) x mean mask probability inside the mask (transformers' Mask2Former convention), where
P(label) is 1 for a given modality (argument or file) and the classifier's probability otherwise; an empty mask
scores 0.

Inference goes through ``prediction.predict``, the package's one front door: whole view or tiles at a scale
(``scale``, ``tile_size``, ``overlap`` call arguments; default the image processor's saved ``inference_scale``,
"auto"), and each result adds ``"scale"`` (the zoom factor of the native pixels it was segmented at, ``None`` for the
whole view) and ``"object_size"`` (the objects' size "auto" estimated, native px).

The forward runs on the fastest correct backend available (``backends.py``: onnxruntime for an fp32 model on the
CPU when it is installed, else the PyTorch model); ``backend="eager"`` / ``"onnxruntime"`` when building or calling
the pipeline, or ``$ESP_MEDSAM_BACKEND``, overrides the automatic choice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageSegmentation
from transformers.image_utils import load_image as load_image_from_url
from transformers.models.auto import modeling_auto
from transformers.pipelines import PIPELINE_REGISTRY, ImageSegmentationPipeline

from .backends import AUTOMATIC_MODALITY
from .image_reading import load_image, to_rgb_uint8
from .prediction import predict, tiling_options

TASK = "medical-image-segmentation"
UNKNOWN_MODALITY = AUTOMATIC_MODALITY
"""Index in a batch for images whose modality the classifier chooses."""


class EspMedSamSegmentationPipeline(ImageSegmentationPipeline):
    """Segments each image's modality target with ESP-MedSAM; see the module docstring for inputs and outputs.

    Call arguments: ``modality`` (name or index, or a list with one per image), ``mask_threshold`` (0.5),
    ``batch_size``, ``timeout`` (for URLs), ``backend`` (``"auto"``, ``"onnxruntime"``, ``"eager"``; also accepted
    when building the pipeline), ``scale``, ``tile_size``, ``overlap`` (``prediction.predict``). Inputs: file paths (DICOM included), URLs, PIL images, numpy arrays,
    or dicts ``{"image": ..., "modality": ..., "file_modality": ...}`` (``file_modality``: a hint read from the
    file by the caller, used like a DICOM tag when no modality is given).
    """

    # Only the image processor: with these unset, pipeline() also looks for a video processor and, finding the
    # image processor's remote-code entry, asks whether to run remote code although the class is given here.
    _load_image_processor = True
    _load_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def check_model_type(self, supported_models):
        if isinstance(supported_models, list):
            return super().check_model_type([*supported_models, type(self.model).__name__])
        return super().check_model_type({**supported_models, self.model.config.model_type: type(self.model).__name__})

    def _sanitize_parameters(self, modality=None, mask_threshold=None, timeout=None, backend=None, scale=None,
                             tile_size=None, overlap=None, **kwargs):
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if backend is not None:
            forward["backend"] = backend
        tiling = {"scale": scale, "tile_size": tile_size, "overlap": overlap}
        forward.update({key: value for key, value in tiling.items() if value is not None})
        if forward.keys() - {"backend"}:  # bad values fail now, naming the argument, before any image is read
            tiling_options(self.image_processor, scale, tile_size, overlap)
        if modality is not None:
            preprocess["modality"] = modality
        if timeout is not None:
            preprocess["timeout"] = timeout
        if mask_threshold is not None:
            postprocess["mask_threshold"] = mask_threshold
        return preprocess, forward, postprocess

    def __call__(self, inputs=None, **kwargs):
        """``modality`` may be a list with one entry per input image (``None`` entries: automatic)."""
        modality = kwargs.get("modality")
        if isinstance(modality, (list, tuple)):
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(modality):
                count = len(inputs) if isinstance(inputs, (list, tuple)) else 1
                raise ValueError(f"got {len(modality)} modalities for {count} image(s); give one per image")
            kwargs.pop("modality")
            inputs = [
                {**item, "modality": item.get("modality", m)} if isinstance(item, dict) else {"image": item, "modality": m}
                for item, m in zip(inputs, modality)
            ]
        return super().__call__(inputs, **kwargs)

    def _read(self, image: Any, timeout: float | None) -> tuple[np.ndarray, str | None]:
        """(RGB uint8 array, modality hint from the file)."""
        percentiles = getattr(self.image_processor, "intensity_percentiles", None)  # as the processor stretches
        if isinstance(image, (str, os.PathLike)):
            if str(image).startswith(("http://", "https://")):
                return to_rgb_uint8(load_image_from_url(str(image), timeout=timeout), percentiles), None
            array, metadata = load_image(image, percentiles)
            return array, metadata.get("modality")
        if isinstance(image, (Image.Image, np.ndarray)):
            return to_rgb_uint8(image, percentiles), None
        if isinstance(image, torch.Tensor):
            array = image.detach().cpu().numpy()
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)
            return to_rgb_uint8(array, percentiles), None
        raise TypeError(
            f"unsupported image input of type {type(image).__name__}; expected a path, URL, PIL image, numpy array, "
            "tensor, or a dict {'image': ..., 'modality': ...}"
        )

    def preprocess(self, image, modality=None, timeout=None):
        hint = None
        if isinstance(image, dict):
            if "image" not in image:
                raise ValueError(f"a dict input needs an 'image' key, got keys {sorted(image)}")
            modality = image["modality"] if image.get("modality") is not None else modality
            hint = image.get("file_modality")
            image = image["image"]
        array, file_modality = self._read(image, timeout)
        file_modality = file_modality or hint
        if modality is not None:
            index, source = self.model.config.modality_index(modality), "given"
        elif file_modality is not None and file_modality in self.model.config.modality_names:
            index, source = self.model.config.modality_index(file_modality), "file"
        else:
            index, source = UNKNOWN_MODALITY, "classifier"
        # The image stays an array: prediction.predict processes it (whole view or tiles); the loader batches
        # arrays as lists.
        return {"image": array, "modality": torch.tensor([index], dtype=torch.long), "modality_source": source}

    def _forward(self, model_inputs, backend: str | None = None, **tiling):
        """The batch through ``prediction.predict``: images with the classifier's modality in one call, images with a
        given modality in another. Outputs are per-image lists (the loader unrolls them)."""
        images, sources = model_inputs["image"], model_inputs["modality_source"]
        if not isinstance(images, list):  # batch_size=1: the item as preprocess made it
            images, sources = [images], [sources]
        requested = model_inputs["modality"].view(-1).tolist()
        rows: list[dict[str, Any]] = [{} for _ in images]
        for automatic in (True, False):
            picked = [i for i, m in enumerate(requested) if (m == UNKNOWN_MODALITY) == automatic]
            if not picked:
                continue
            modality = None if automatic else [requested[i] for i in picked]
            prediction = predict(self.model, self.image_processor, [images[i] for i in picked], modality,
                                 backend=backend, **tiling)
            probabilities = prediction.modality_logits.float().softmax(-1)
            for j, i in enumerate(picked):
                chosen = prediction.modality[j]
                rows[i] = {"probabilities": torch.sigmoid(prediction.logits[j]), "modality": chosen,
                           "modality_probability": float(probabilities[j, chosen]), "scale": prediction.scales[j],
                           "object_size": prediction.object_sizes[j], "modality_source": sources[i]}
        return {key: [row[key] for row in rows] for key in rows[0]}

    def postprocess(self, model_outputs, mask_threshold: float = 0.5):
        # One image: the loader unrolls batches into single entries (a tensor gains a batch axis of 1); without
        # batching the lists of one come as _forward made them.
        item = {key: value[0] if isinstance(value, list) else value for key, value in model_outputs.items()}
        source, index = item["modality_source"], int(item["modality"])
        probabilities = item["probabilities"].reshape(item["probabilities"].shape[-2:])
        mask = probabilities >= mask_threshold
        modality_probability = float(item["modality_probability"])
        label_probability = modality_probability if source == "classifier" else 1.0
        mask_score = float(probabilities[mask].mean()) if bool(mask.any()) else 0.0
        config = self.model.config
        return [
            {
                "label": config.id2label[index + 1],
                "score": label_probability * mask_score,
                "mask": Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L"),
                "modality": config.modality_names[index],
                "modality_probability": modality_probability,
                "modality_source": source,
                "scale": item["scale"],
                "object_size": item["object_size"],
            }
        ]


def register() -> None:
    """Register the task (idempotent) and declare the model to transformers' image-segmentation pipelines.

    The declaration only silences the stock pipeline's "model is not supported" log line in this process.
    """
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl")
    if registered is None or registered.__qualname__ != EspMedSamSegmentationPipeline.__qualname__:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=EspMedSamSegmentationPipeline, pt_model=AutoModelForImageSegmentation, type="image"
        )
    else:  # already registered (e.g. by the installed package): keep its entry and make this class savable too
        EspMedSamSegmentationPipeline._registered_impl = {TASK: {**PIPELINE_REGISTRY.supported_tasks[TASK]}}
        EspMedSamSegmentationPipeline._registered_impl[TASK]["impl"] = EspMedSamSegmentationPipeline
    modeling_auto.MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES.setdefault("esp_medsam", "EspMedSamModel")


def save_pretrained_with_pipeline(model, processor, directory: str | os.PathLike) -> Path:
    """Save a model folder that both pipelines load: model and code, image processor, processor, custom pipeline.

    ``processor`` is an ``EspMedSamProcessor`` or an ``EspMedSamImageProcessor``. ``config.json`` gets
    ``custom_pipelines`` (the "medical-image-segmentation" task) and the folder gets this file and the modules it
    imports (``image_reading.py``, and ``backends.py`` with ``export.py`` and ``fileio.py`` for the onnxruntime backend).
    """
    image_processor = getattr(processor, "image_processor", processor)
    pipe = EspMedSamSegmentationPipeline(model=model, image_processor=image_processor, task=TASK)
    directory = Path(directory)
    pipe.save_pretrained(directory)
    if processor is not image_processor:
        processor.save_pretrained(directory)
    return directory


def segment(
    images: Any | Sequence[Any], model, image_processor, modality=None, batch_size: int = 1, **kwargs
) -> list[list[dict[str, Any]]] | list[dict[str, Any]]:
    """Run the pipeline on an in-memory model (no folder needed): same inputs and outputs as the pipeline."""
    pipe = EspMedSamSegmentationPipeline(model=model, image_processor=image_processor, task=TASK)
    return pipe(images, modality=modality, batch_size=batch_size, **kwargs)


register()

__all__ = ["TASK", "EspMedSamSegmentationPipeline", "register", "save_pretrained_with_pipeline", "segment"]
