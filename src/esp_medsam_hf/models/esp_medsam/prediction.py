"""Segmenting a batch of images: ``predict`` runs processor -> backend -> post-processing and gives a
``Prediction``. Ships with saved models as remote code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends import run_inference


@dataclass
class Prediction:
    """What :func:`predict` gives for a batch: a mask per image and what the modality classifier said."""

    masks: list[np.ndarray]
    """HxW bool masks, each at its image's size."""
    modality: list[int]
    """The modality index each image was decoded with: the given one, else the classifier's choice."""
    modality_logits: torch.Tensor | None
    """(B, M) float32 classifier logits on the CPU; ``None`` for a model without a classifier (the teacher)."""

    @property
    def classifier_modality(self) -> list[int | None]:
        """The modality the classifier picks for each image, whatever modality was given."""
        if self.modality_logits is None:
            return [None] * len(self.masks)
        return self.modality_logits.argmax(-1).tolist()

    @property
    def modality_probabilities(self) -> list[list[float]] | None:
        """The classifier's probability of each modality, per image (``None`` without a classifier)."""
        if self.modality_logits is None:
            return None
        return self.modality_logits.softmax(-1).tolist()


def predict(
    model, processor, images: Sequence[Any], modality: Any = None, *, backend: str | None = "eager",
    target: int | str | None = None,
) -> Prediction:
    """Segment a batch of images: ``processor`` -> ``model`` -> ``processor.post_process_masks``.

    ``processor`` is an ``EspMedSamProcessor``; ``modality`` is what it takes (a name or index for every image, or
    one per image), or ``None`` for the classifier to choose. The pixel values go to the model's device and through
    ``backends.run_inference`` with ``backend`` (``"eager"``: the PyTorch model; ``None``: the automatic choice,
    onnxruntime for an fp32 model on the CPU when installed). Masks keep the logits above 0 (probability 0.5).
    ``target`` (a name or index in ``model.config.all_target_names``) decodes that target for every image instead.
    """
    device = next(model.parameters()).device
    index = None if target is None else model.config.target_index(target)
    inputs = processor(images=images, modality=None if index is not None else modality, return_tensors="pt")
    outputs = run_inference(model, inputs["pixel_values"].to(device), inputs.get("modality"), backend=backend,
                            target=index)
    masks = processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"])
    logits = outputs.modality_logits
    return Prediction(
        masks=[mask.numpy().astype(bool) for mask in masks],
        modality=outputs.modality.tolist(),
        modality_logits=None if logits is None else logits.float().cpu(),
    )


__all__ = ["Prediction", "predict"]
