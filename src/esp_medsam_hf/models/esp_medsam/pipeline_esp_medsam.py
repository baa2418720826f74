"""The "medical-image-segmentation" pipeline: ESP-MedSAM with a modality per call or per image, batched.

``pipeline("medical-image-segmentation", model=DIR, trust_remote_code=True)`` builds it from a folder saved with
``save_pretrained_with_pipeline`` (the class ships as remote code through ``config.json["custom_pipelines"]``);
with this package imported, ``pipeline(..., pipeline_class=EspMedSamSegmentationPipeline)`` works without remote code.

Each image gives one segment, in the image-segmentation pipeline's format plus the modality:
``[{"label": target, "score": s, "mask": PIL "L" (0/255, original size), "modality": name,
"modality_probability": p, "modality_source": "given" | "file" | "classifier"}]``.
The modality comes from, in order: the image's own ``{"image": ..., "modality": ...}`` or the per-image list
``modality=[...]``; the call's ``modality=``; the file (an unambiguous DICOM Modality tag, see ``image_reading.py``); the
model's modality classifier. ``modality_probability`` is the classifier's probability of the modality used,
whatever its source; ``score`` = that probability x mean mask probability inside the mask (transformers'
Mask2Former convention; an empty mask scores 0). When the modality is given (argument or file) and the classifier
prefers another one, a warning names both and the segment gets ``"classifier_modality"`` (the classifier's choice).
``threshold`` (``None`` by default: keep every segment) leaves out segments scoring below it, as transformers'
image-segmentation pipeline does. An unknown keyword argument is a ``TypeError``.

Optional prompts correct the self-prompted mask (``points=[[x, y], ...]`` with ``point_labels=[1, 0, ...]``, 1
positive and 0 negative, default all positive; ``boxes=[[x0, y0, x1, y1], ...]``; original-image pixels): one
segment per box (the points, if any, refine a single box's object), or one segment for points alone; each segment
also has ``"iou_score"`` (the mask's stability score). Prompted calls run the PyTorch model on the whole view, one
image at a time.

Inference goes through ``prediction.predict``, the package's one front door: whole view or tiles at a scale
(``scale``, ``tile_size``, ``overlap`` call arguments; default the image processor's saved ``inference_scale``,
"auto"), and each result adds ``"scale"`` (the zoom factor of the native pixels it was segmented at, ``None`` for the
whole view) and ``"object_size"`` (the objects' size "auto" estimated, native px).

The forward runs on the fastest correct backend available (``backends.py``: onnxruntime for an fp32 model on the
CPU when it is installed, else the PyTorch model); ``backend="eager"`` / ``"onnxruntime"`` when building or calling
the pipeline, or ``$ESP_MEDSAM_BACKEND``, overrides the automatic choice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageSegmentation
from transformers.image_utils import load_image as load_image_from_url
from transformers.models.auto import modeling_auto
from transformers.pipelines import PIPELINE_REGISTRY, ImageSegmentationPipeline, PipelineRegistry

from .backends import AUTOMATIC_MODALITY
from .image_intensity import to_rgb_uint8
from .image_reading import load_image
from .prediction import modality_name, predict, tiling_options, without_small_bodies
from .processing_esp_medsam import rescale_prompts

logger = logging.getLogger(__name__)

TASK = "medical-image-segmentation"
UNKNOWN_MODALITY = AUTOMATIC_MODALITY
"""Index in a batch for images whose modality the classifier chooses."""
PROMPT_ARGUMENTS = {"input_points": "points", "input_labels": "point_labels", "input_boxes": "boxes"}
"""The pipeline's names of SAM's prompt arguments."""


class EspMedSamSegmentationPipeline(ImageSegmentationPipeline):
    """Segments each image's modality target with ESP-MedSAM; see the module docstring for inputs and outputs.

    Call arguments: ``modality`` (name or index, or a list with one per image), ``mask_threshold`` (``None``:
    ``prediction.predict``'s mask; a probability: the probabilities at or above it; 0.5 for prompts),
    ``threshold`` (minimum segment score; ``None``), ``batch_size``, ``timeout`` (for URLs), ``backend``
    (``"auto"``, ``"onnxruntime"``, ``"eager"``; also accepted when building the pipeline), ``scale``,
    ``tile_size``, ``overlap``, ``int8`` (``prediction.predict``; ``int8=False`` keeps onnxruntime in float32),
    ``points``, ``point_labels``, ``boxes`` (prompts, see the module docstring), ``target`` (a name or index of
    ``config.all_target_names``: decode that target, e.g. a target added to a modality, for every image; the
    modality is the target's and the segment's label its name). Inputs: file paths (DICOM included), URLs, PIL images, numpy arrays,
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

    def _sanitize_parameters(
        self, modality=None, mask_threshold=None, threshold=None, timeout=None, backend=None, scale=None,
        tile_size=None, overlap=None, points=None, point_labels=None, boxes=None, int8=None, target=None, **unknown
    ):
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {', '.join(sorted(unknown))}; it takes "
                "modality, mask_threshold, threshold, timeout, backend, scale, tile_size, overlap, points, "
                "point_labels, boxes, int8, target (and batch_size, num_workers)"
            )
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if points is not None or point_labels is not None or boxes is not None:
            if (getattr(self, "_batch_size", None) or 1) > 1:
                raise ValueError("points= and boxes= prompt one image at a time: leave batch_size at 1")
            preprocess["prompts"] = prompt_arguments(points, point_labels, boxes)
        if backend is not None:
            forward["backend"] = backend
        if int8 is not None:
            forward["int8"] = bool(int8)
        tiling = {"scale": scale, "tile_size": tile_size, "overlap": overlap}
        forward.update({key: value for key, value in tiling.items() if value is not None})
        if forward.keys() - {"backend", "int8"}:  # bad values fail now, naming the argument, before any image is read
            tiling_options(self.image_processor, scale, tile_size, overlap)
        if target is not None:
            modality = self._target_modality(target, modality)
            forward["target"] = postprocess["target"] = self.model.config.target_index(target)
        if modality is not None:
            preprocess["modality"] = modality
        if timeout is not None:
            preprocess["timeout"] = timeout
        if mask_threshold is not None:
            postprocess["mask_threshold"] = mask_threshold
        if threshold is not None:
            postprocess["threshold"] = threshold
        return preprocess, forward, postprocess

    def _target_modality(self, target, modality):
        """The modality of ``target`` (a name or index of ``config.all_target_names``); a ``modality`` given beside
        it must be that one."""
        config = self.model.config
        own = config.modality_names[config.target_modalities[config.target_index(target)]]
        if modality is not None and (isinstance(modality, (list, tuple)) or config.modality_index(modality) !=
                                     config.modality_index(own)):
            raise ValueError(f"target {target!r} is a target of {own!r} images; give no other modality= beside it")
        return own

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

    def preprocess(self, image, modality=None, timeout=None, prompts=None):
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
        requested = torch.tensor([index], dtype=torch.long)
        if prompts is not None:
            return self._preprocess_prompted(array, requested, source, prompts)
        # The image stays an array: prediction.predict processes it (whole view or tiles); the loader batches
        # arrays as lists.
        return {"image": array, "modality": requested, "modality_source": source}

    def _preprocess_prompted(self, array: np.ndarray, requested: torch.Tensor, source: str, prompts: dict) -> dict:
        """The prompted branch's inputs: the whole view's pixel values and the prompts rescaled to them."""
        inputs = self.image_processor(images=[array], return_tensors="pt").to(self.dtype)
        sizes = [array.shape[:2]]
        inputs.update(rescale_prompts(sizes, self.image_processor.resized_sizes(sizes), **prompts, names=PROMPT_ARGUMENTS))
        return {**inputs, "modality": requested, "modality_source": source, "target_size": tuple(array.shape[:2])}

    def _forward(self, model_inputs, backend: str | None = None, int8: bool | None = None, target: int | None = None,
                 **tiling):
        """The batch through ``prediction.predict``: images with the classifier's modality in one call, images with a
        given modality in another (decoding ``target`` when given). Outputs are per-image lists (the loader unrolls
        them). Prompted inputs take ``_forward_prompted``."""
        if "input_points" in model_inputs or "input_boxes" in model_inputs:
            return self._forward_prompted(model_inputs, target)
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
                                 backend=backend, int8=int8, target=target, **tiling)
            probabilities = prediction.modality_logits.float().softmax(-1)
            for j, i in enumerate(picked):
                chosen = prediction.modality[j]
                rows[i] = {"probabilities": torch.sigmoid(prediction.logits[j]),
                           "mask": torch.from_numpy(prediction.masks[j]), "modality": chosen,
                           "modality_probability": float(probabilities[j, chosen]),
                           "classifier_modality": int(probabilities[j].argmax()), "scale": prediction.scales[j],
                           "object_size": prediction.object_sizes[j], "modality_source": sources[i]}
        return {key: [row[key] for row in rows] for key in rows[0]}

    def _forward_prompted(self, model_inputs: dict, target: int | None = None) -> dict[str, Any]:
        """The prompted branch: the PyTorch model on the whole view with the prompts (``input_*`` tensors)."""
        requested = model_inputs.pop("modality")
        extras = {key: model_inputs.pop(key) for key in ("modality_source", "target_size")}
        modality = None if int(requested[0]) == UNKNOWN_MODALITY else requested.to(self.model.device)
        prompts = {k: v.to(self.model.device) for k, v in model_inputs.items() if k.startswith("input_")}
        if target is not None:
            prompts["target"], modality = torch.full_like(requested, target).to(self.model.device), None
        outputs = self.model(pixel_values=model_inputs["pixel_values"].to(self.model.device), modality=modality,
                             **prompts)
        probabilities = outputs.modality_logits.float().softmax(-1)
        return {
            "pred_masks": outputs.pred_masks, "iou_scores": outputs.iou_scores, "modality": outputs.modality,
            "modality_probability": probabilities.gather(1, outputs.modality.view(-1, 1))[:, 0],
            "classifier_modality": probabilities.argmax(-1), **extras,
        }

    def _classifier_disagrees(self, index: int, source: str, choice: int, probability: float) -> str | None:
        """The classifier's modality name when it prefers another one than a given modality (logged), else None."""
        if source == "classifier" or choice == index:
            return None
        names = self.model.config.modality_names
        logger.warning(
            "modality %r was %s but the modality classifier gives it %.1f%% and prefers %r",
            names[index], "given" if source == "given" else "read from the file", 100 * probability, names[choice],
        )
        return names[choice]

    def _segment(self, mask: torch.Tensor, probabilities: torch.Tensor, index: int, source: str,
                 modality_probability: float, classifier_modality: int, target: int | None = None) -> dict[str, Any]:
        """One segment: score = the classifier's probability of the modality used x mean mask probability; labelled
        with ``target``'s name (default: the modality's own target)."""
        mask_score = float(probabilities[mask].mean()) if bool(mask.any()) else 0.0
        config = self.model.config
        segment = {
            "label": config.id2label[(index if target is None else target) + 1],
            "score": modality_probability * mask_score,
            "mask": Image.fromarray(mask.numpy().astype(np.uint8) * 255, mode="L"),
            "modality": config.modality_names[index],
            "modality_probability": modality_probability,
            "modality_source": source,
        }
        disagreement = self._classifier_disagrees(index, source, classifier_modality, modality_probability)
        if disagreement is not None:
            segment["classifier_modality"] = disagreement
        return segment

    def postprocess(self, model_outputs, mask_threshold: float | None = None, threshold: float | None = None,
                    target: int | None = None):
        """``mask_threshold`` ``None``: ``prediction.predict``'s mask (the modality's calibrated threshold, less its
        small bodies); a probability: the probabilities at or above it, less the same small bodies."""
        if "iou_scores" in model_outputs:
            segments = self._postprocess_prompted(model_outputs, 0.5 if mask_threshold is None else mask_threshold,
                                                  target)
        else:
            # One image: the loader unrolls batches into single entries (a tensor gains a batch axis of 1); without
            # batching the lists of one come as _forward made them.
            item = {key: value[0] if isinstance(value, list) else value for key, value in model_outputs.items()}
            probabilities = item["probabilities"].reshape(item["probabilities"].shape[-2:])
            mask = item["mask"].reshape(probabilities.shape)
            if mask_threshold is not None:
                name = modality_name(self.model, int(item["modality"]))
                mask = torch.from_numpy(without_small_bodies(self.image_processor,
                                                             (probabilities >= mask_threshold).numpy(), name))
            segment = self._segment(
                mask, probabilities, int(item["modality"]), item["modality_source"],
                float(item["modality_probability"]), int(item["classifier_modality"]), target,
            )
            segments = [{**segment, "scale": item["scale"], "object_size": item["object_size"]}]
        return [s for s in segments if threshold is None or s["score"] >= threshold]

    def _postprocess_prompted(self, model_outputs, mask_threshold: float, target: int | None = None
                              ) -> list[dict[str, Any]]:
        """One segment per prompted object: as the prompt-free segment, plus ``iou_score``."""
        target_size, source = model_outputs["target_size"], model_outputs["modality_source"]
        pred_masks = model_outputs["pred_masks"].float().cpu()
        probabilities = self.image_processor.post_process_masks(
            pred_masks.reshape(1, -1, 1, *pred_masks.shape[-2:]), [list(target_size)], binarize=False,
            return_probabilities=True,
        )[0][:, 0]
        index = int(model_outputs["modality"].reshape(-1)[0])
        modality_probability = float(model_outputs["modality_probability"].reshape(-1)[0])
        choice = int(model_outputs["classifier_modality"].reshape(-1)[0])
        return [
            {**self._segment(probs >= mask_threshold, probs, index, source, modality_probability, choice, target),
             "iou_score": iou}
            for probs, iou in zip(probabilities, model_outputs["iou_scores"].reshape(-1).tolist())
        ]


# What ``Pipeline.save_pretrained`` reads to write ``custom_pipelines`` and the pipeline's code: set on the class
# through a registry of its own, so that saving works without touching transformers' global PIPELINE_REGISTRY.
PipelineRegistry(supported_tasks={}, task_aliases={}).register_pipeline(
    TASK, pipeline_class=EspMedSamSegmentationPipeline, pt_model=AutoModelForImageSegmentation, type="image"
)


def prompt_arguments(points, point_labels, boxes) -> dict[str, torch.Tensor]:
    """The pipeline's ``points``/``point_labels``/``boxes`` (original-image pixels) as SAM's (1, N, P, 2),
    (1, N, P) and (1, N, 4) tensors (``input_points``...): one object per box, or one object for points alone."""
    prompts: dict[str, torch.Tensor] = {}
    objects = 1
    if boxes is not None:
        box_tensor = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) if len(boxes) else None
        if box_tensor is None:
            raise ValueError("boxes= must hold at least one [x0, y0, x1, y1] box")
        objects = box_tensor.shape[0]
        prompts["input_boxes"] = box_tensor[None]
    if points is None:
        if point_labels is not None:
            raise ValueError("point_labels= needs points=")
        return prompts
    point_tensor = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 2)
    labels = torch.ones(len(point_tensor), dtype=torch.long) if point_labels is None else torch.as_tensor(point_labels)
    if labels.shape != (len(point_tensor),):
        raise ValueError(f"point_labels= needs one label (1 positive, 0 negative) per point: {len(point_tensor)} "
                         f"points, labels of shape {tuple(labels.shape)}")
    if objects != 1:
        raise ValueError(f"points= refine one object: give them with a single box, not {objects}")
    prompts["input_points"], prompts["input_labels"] = point_tensor[None, None], labels.long()[None, None]
    return prompts


def register() -> None:
    """Register the task with transformers' ``pipeline()`` (idempotent) and declare the model to its stock
    image-segmentation pipeline; ``esp_medsam_hf.register()`` calls it, importing this module does not.

    The declaration only silences the stock pipeline's "model is not supported" log line in this process.
    """
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is not EspMedSamSegmentationPipeline:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=EspMedSamSegmentationPipeline, pt_model=AutoModelForImageSegmentation, type="image"
        )
    modeling_auto.MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES.setdefault("esp_medsam", "EspMedSamModel")


_UNSET = object()


@contextmanager
def _as_remote_code(*objects: Any):
    """Within the block, ``save_pretrained`` of ``objects`` (model, config, image processor, processor) writes their
    code and ``auto_map`` as ``register_for_auto_class`` makes it; the classes are left as they were after."""
    classes = {type(obj): auto_class for obj, auto_class in objects}
    before = {cls: cls.__dict__.get("_auto_class", _UNSET) for cls in classes}
    try:
        for cls, auto_class in classes.items():
            cls._auto_class = cls._auto_class or auto_class
        yield
    finally:
        for cls, value in before.items():
            if value is _UNSET:
                del cls._auto_class
            else:
                cls._auto_class = value


def save_pretrained_with_pipeline(model, processor, directory: str | os.PathLike) -> Path:
    """Save a model folder that both pipelines load: model and code, image processor, processor, custom pipeline.

    ``processor`` is an ``EspMedSamProcessor`` or an ``EspMedSamImageProcessor``. ``config.json`` gets
    ``custom_pipelines`` (the "medical-image-segmentation" task) and the folder gets this file and the modules it
    imports (``image_reading.py`` with ``image_intensity.py``, and ``backends.py`` with ``export.py`` and ``fileio.py``
    for the onnxruntime backend).
    The code and ``auto_map`` are written whether or not ``esp_medsam_hf.register()`` ran.
    """
    image_processor = getattr(processor, "image_processor", processor)
    pipe = EspMedSamSegmentationPipeline(model=model, image_processor=image_processor, task=TASK)
    directory = Path(directory)
    shipped = [(model, "AutoModel"), (model.config, "AutoConfig"), (image_processor, "AutoImageProcessor")]
    if processor is not image_processor:
        shipped.append((processor, "AutoProcessor"))
    with _as_remote_code(*shipped):
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


__all__ = ["TASK", "EspMedSamSegmentationPipeline", "register", "save_pretrained_with_pipeline", "segment"]
