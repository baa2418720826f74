"""Prompted training (stage 3's ``prompt_fraction``): a seeded fraction of the optimizer's batches are prompted,
the rest stay prompt-free as before.

A prompted batch is either a **boxes** batch or a **clicks** batch (even odds), its prompts simulated from the
ground truth (``data.prompt_simulation``, the geometry the evaluation's boxes and clicks use):

- boxes: one box per 8-connected object, each side pushed out by ``BOX_MARGIN`` pixels plus a uniform random
  share (up to ``prompt_box_jitter``) of the box's side, inside the image, as MedSAM's training jitters its boxes
  outwards; at most ``prompt_max_objects`` objects per image (drawn at random when there are more), padded with
  whole-image boxes that the loss ignores. An object's row is trained towards the ground truth inside its box (the
  model segments its modality's target, and keeps a box's mask inside the box).
- clicks: one click per image at the centre of the largest error region of the model's current prompt-free
  prediction (positive on a missed region, negative on an extra one; padding, label -1, when the prediction is
  exact), trained towards the whole ground truth, as SAM's interactive training does.

The loss of a prompted batch is the paper's mask loss on the prompted masks (over the real rows) plus the patch loss
and the modality classifier's loss, weighted as the prompt-free loss. The decoder has one mask query per modality,
so a prompt gives one mask (K = 1): the loss is SAM's single-mask case, there is no best-of-K. Which batches are
prompted, their kind and their jitter come from ``(seed, epoch, batch index)``, so a resumed run draws what an
uninterrupted one draws.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.prompt_simulation import click_at_largest_error, component_boxes
from ..models.esp_medsam.losses import mask_loss_of, patch_loss_of
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel, check_prompts, inside_boxes

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("boxes", "clicks")
BOX_MARGIN = 2
"""Pixels every simulated box is pushed out by before its jitter (the evaluation's ground-truth boxes are 2 px
wider than their objects too), so that the mask, which a box keeps inside it, can reach the object's rim."""
_STREAM = 0x50524F4D  # separates these draws from the augmentation's, which are keyed by (seed, epoch, index)


@dataclass(frozen=True)
class PromptDraw:
    """The prompts of one batch: their ``kind`` (``PROMPT_KINDS``), the seed of their jitter and draws, and the
    stage's limits."""

    kind: str
    seed: int
    max_objects: int
    box_jitter: float

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def draw_prompt(fraction: float, seed: int, epoch: int, batch: int, *, max_objects: int,
                box_jitter: float) -> PromptDraw | None:
    """Whether batch ``batch`` of ``epoch`` is prompted (probability ``fraction``) and how; None: prompt-free."""
    if fraction <= 0:
        return None
    rng = np.random.default_rng([int(seed), _STREAM, int(epoch), int(batch)])
    if rng.random() >= fraction:
        return None
    kind = PROMPT_KINDS[int(rng.random() < 0.5)]
    return PromptDraw(kind, int(rng.integers(2**62)), max_objects, box_jitter)


def simulate_boxes(labels: np.ndarray, draw: PromptDraw) -> tuple[np.ndarray, np.ndarray]:
    """(B, N, 4) boxes x0, y0, x1, y1 in model-input pixels around the objects of binary ``labels`` (B, S, S), at
    most ``draw.max_objects`` per image, jittered outwards, and (B, N) which rows are real (the rest are whole-image
    padding boxes); N >= 1 is the largest count in the batch."""
    rng = draw.rng()
    size = labels.shape[-1]
    per_image = []
    for mask in labels:
        boxes = component_boxes(mask, margin=0)
        boxes[:, 2:] += 1  # inclusive last pixel -> the box's far edge: pixel c covers [c, c + 1]
        if len(boxes) > draw.max_objects:
            boxes = boxes[np.sort(rng.choice(len(boxes), draw.max_objects, replace=False))]
        sides = np.tile(boxes[:, 2:] - boxes[:, :2], 2)  # width, height, width, height
        push = BOX_MARGIN + rng.uniform(0, draw.box_jitter, size=boxes.shape) * sides
        per_image.append(np.clip(boxes + push * np.array([-1, -1, 1, 1]), 0, size))
    count = max(1, max(len(boxes) for boxes in per_image))
    out = np.tile(np.array([0, 0, size, size], dtype=np.float32), (len(labels), count, 1))
    real = np.zeros((len(labels), count), dtype=bool)
    for i, boxes in enumerate(per_image):
        out[i, : len(boxes)], real[i, : len(boxes)] = boxes, True
    return out, real


def simulate_clicks(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 1, 1, 2) points x, y (pixel indices) and (B, 1, 1) labels: per image one click at the centre of the
    largest error region of ``predictions`` against ``labels`` (both (B, S, S) bool); 1 on a miss, 0 on an extra
    region, -1 (padding) where the prediction is exact."""
    points = np.zeros((len(labels), 1, 1, 2), dtype=np.float32)
    kinds = np.full((len(labels), 1, 1), -1, dtype=np.int64)
    for i, (prediction, reference) in enumerate(zip(predictions, labels)):
        click = click_at_largest_error(prediction, reference)
        if click is not None:
            points[i, 0, 0], kinds[i, 0, 0] = click[:2], click[2]
    return points, kinds


def prompted_loss(model: EspMedSamModel, image_embeddings: torch.Tensor, modality: torch.LongTensor,
                  labels: torch.Tensor, draw: PromptDraw) -> torch.Tensor:
    """The loss of a prompted batch decoded from its image embeddings (see the module docstring): the mask loss of
    the prompted masks over the real rows plus ``patch_loss_weight`` times the patch loss."""
    size, config = model.config.image_size, model.config
    masks_np = labels.detach().reshape(labels.shape[0], *labels.shape[-2:]).cpu().numpy() > 0.5
    device = image_embeddings.device
    if draw.kind == "boxes":
        boxes, real = simulate_boxes(masks_np, draw)
        prompts = check_prompts(None, None, torch.from_numpy(boxes), len(boxes), size, device)
        rows = labels.reshape(len(boxes), 1, *labels.shape[-2:]).repeat_interleave(boxes.shape[1], dim=0)
        inside = inside_boxes(prompts.boxes, rows.shape[-1], size, overlap=False)[:, None]
        targets = rows * inside.to(rows.dtype)
    else:
        with torch.no_grad():
            free = model.decode_embeddings(image_embeddings, modality).pred_masks
            free = F.interpolate(free.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        points, kinds = simulate_clicks(free[:, 0].cpu().numpy() > 0, masks_np)
        prompts = check_prompts(torch.from_numpy(points), torch.from_numpy(kinds), None, len(points), size, device)
        targets = labels.reshape(len(points), 1, *labels.shape[-2:])
        real = np.ones((len(points), 1), dtype=bool)
    output = model.decode_prompts(image_embeddings, modality, prompts)
    masks = output.pred_masks.flatten(0, 1)  # (B * N, 1, h, w)
    keep = torch.from_numpy(real.reshape(-1)).to(device)
    mask_loss = (mask_loss_of(masks[keep], targets[keep], config.focal_loss_weight) if bool(keep.any())
                 else masks.sum() * 0)
    return mask_loss + config.patch_loss_weight * patch_loss_of(output.patch_logits, labels)


class EspMedSamPromptedTraining(nn.Module):
    """An ``EspMedSamModel`` that trains on images with prompted batches too, as one module for
    ``accelerate.prepare``: a prompt-free batch's loss is the model's own (``losses.batch_loss``), a prompted one's
    is :func:`prompted_loss` on the embeddings of one encoder pass, plus the modality classifier's loss as the
    model adds it."""

    def __init__(self, model: EspMedSamModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, modality: torch.LongTensor, labels: torch.Tensor,
                prompt: PromptDraw | None = None) -> torch.Tensor:
        model = self.model
        if prompt is None:
            return model(pixel_values=pixel_values, modality=modality, labels=labels).loss
        given = model.check_inputs(pixel_values, modality)
        image_embeddings, modality_logits, chosen = model.encode(pixel_values, given)
        loss = prompted_loss(model, image_embeddings, chosen, labels, prompt)
        if model.config.modality_loss_weight > 0:
            loss = loss + model.config.modality_loss_weight * F.cross_entropy(modality_logits, model.modality_of(given))
        return loss


def prompted_batch_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    """``compute_loss`` of stage 3 on images with prompted batches (``EspMedSamPromptedTraining``)."""
    return module(batch["pixel_values"], batch["modality"], batch["labels"], batch.get("prompt"))


def prompted_cached_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    """``compute_loss`` of stage 3 on cached features with prompted batches (``EspMedSamAfterCache``)."""
    return module(batch["features"], batch["pooled_features"], batch["modality"], batch["labels"],
                  prompt=batch.get("prompt"))


def prompt_trainable(model: EspMedSamModel) -> list[nn.Module]:
    """The prompt encoder's parts that a click trains: the negative and positive point embeddings and the padding
    embedding (its box-corner embeddings stay: boxes are not tokens in this model, ``edit_patch_map``)."""
    encoder = model.prompt_encoder
    return [encoder.point_embed[0], encoder.point_embed[1], encoder.not_a_point_embed]


def add_prompts(task, config) -> None:
    """Make ``task`` (stage 3's, on images or on cached features) draw prompted batches with
    ``config.prompt_fraction``: its batches get a ``prompt`` (``draw_prompt``) and its loss decodes them; on images
    the model is wrapped in ``EspMedSamPromptedTraining`` (save and validation unwrap it)."""
    def prepare_batch(batch: dict, epoch: int, index: int) -> dict:
        draw = draw_prompt(config.prompt_fraction, config.seed, epoch, index, max_objects=config.prompt_max_objects,
                           box_jitter=config.prompt_box_jitter)
        return batch if draw is None else {**batch, "prompt": draw}

    task.prepare_batch = prepare_batch
    task.find_unused_parameters = True  # a prompt-free or boxes batch leaves the point embeddings without gradient
    if config.cache_features:  # the task trains an EspMedSamAfterCache
        task.compute_loss = prompted_cached_loss
        return
    save, validate = task.save, task.validate
    task.model = EspMedSamPromptedTraining(task.model)
    task.compute_loss = prompted_batch_loss
    task.save = lambda module, folder: save(module.model, folder)
    if validate is not None:
        task.validate = lambda module: validate(module.model)
