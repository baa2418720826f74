"""An interactive session on one image: encoded once, its prompt-free mask corrected by clicks and boxes decoded
from the cached image embedding (SamModel's ``get_image_embeddings`` then ``image_embeddings=``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

OBJECTS_PER_DECODE = 16
"""Object rows decoded per model call: each row repeats the image embedding, so a batch of them is memory-bound."""


class EspMedSamPromptSession:
    """``session = EspMedSamPromptSession(model, processor, image, modality)`` runs the encoder once and keeps the
    prompt-free mask (``free_mask``); ``session.mask(points=..., labels=..., boxes=...)`` decodes prompts in
    original-image pixels from the cached embedding and returns the union of the objects' masks (H, W) bool.

    ``points`` ([x, y], ...) with ``labels`` (1 positive, 0 negative) refine one object, the whole self-prompted
    mask; ``boxes`` ([x0, y0, x1, y1], ...) give one object each (the points, if any, then apply to every box).
    """

    def __init__(self, model, processor, image: np.ndarray, modality: Any = None):
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        inputs = processor(images=[image], modality=modality, return_tensors="pt")
        self.original_sizes = inputs["original_sizes"]
        self.resized_sizes = processor.image_processor.resized_sizes(self.original_sizes)
        modality = inputs.get("modality")
        with torch.inference_mode():
            outputs = model(inputs["pixel_values"].to(self.device),
                            modality=None if modality is None else modality.to(self.device))
        self.image_embeddings = outputs.image_embeddings
        self.modality = outputs.modality
        self.free_logits = outputs.pred_masks
        self.free_mask = self._masks(outputs.pred_masks)

    def _masks(self, pred_masks: torch.Tensor) -> np.ndarray:
        """Low-resolution logits (1, 1, h, w) or (1, N, 1, h, w) -> the union of the objects' masks (H, W)."""
        masks = self.processor.post_process_masks(pred_masks.float().cpu(), self.original_sizes)[0]
        return (masks.reshape(-1, *masks.shape[-2:]).any(dim=0) if masks.dim() > 2 else masks).numpy()

    def mask(
        self,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        boxes: Sequence[Sequence[float]] | None = None,
    ) -> np.ndarray:
        """The mask with these prompts (original-image pixels); the prompt-free mask without any."""
        if not points and boxes is None:
            return self.free_mask
        from .processing_esp_medsam import rescale_prompts

        objects = 1 if boxes is None else len(boxes)
        if objects == 0:
            return np.zeros_like(self.free_mask)
        given: dict[str, Any] = {}
        if boxes is not None:
            given["input_boxes"] = [list(map(list, boxes))]
        if points:
            point_labels = [1] * len(points) if labels is None else list(labels)
            given["input_points"] = [[list(map(list, points))] * objects]
            given["input_labels"] = [[point_labels] * objects]
        prompts = rescale_prompts(self.original_sizes, self.resized_sizes, **given)
        logits = []
        with torch.inference_mode():
            for start in range(0, objects, OBJECTS_PER_DECODE):
                chunk = {k: v[:, start : start + OBJECTS_PER_DECODE].to(self.device) for k, v in prompts.items()}
                output = self.model(image_embeddings=self.image_embeddings, modality=self.modality, **chunk)
                logits.append(output.pred_masks.float().cpu())
        return self._masks(torch.cat(logits, dim=1))


__all__ = ["EspMedSamPromptSession"]
