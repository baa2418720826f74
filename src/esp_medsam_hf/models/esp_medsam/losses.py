"""The losses of ESP-MedSAM (arXiv 2407.14153), shared by the student, the teacher and the training stages.

- ``mask_and_patch_losses``: the paper's two terms, the mask loss ``lambda * focal + (1 - lambda) * dice`` on the
  upsampled mask logits and the BCE of the patch logits against the label max-pooled to the patch grid;
- ``segmentation_loss``: their weighted sum with a config's weights, as both models return it with ``labels``;
- ``batch_loss``: the loss a model returns for a collated training batch (what the segmentation stages minimise).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


class SegmentationLoss(NamedTuple):
    """The total loss and its two terms (unpacks as ``total, mask, patch``)."""

    total: torch.Tensor
    mask: torch.Tensor
    patch: torch.Tensor


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch (torchvision has focal loss but no Dice loss)."""
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    intersection = (probs * targets).sum(1)
    return (1 - (2 * intersection + smooth) / (probs.sum(1) + targets.sum(1) + smooth)).mean()


def check_binary_labels(labels: torch.Tensor) -> None:
    """Refuse labels that are not 0/1 masks (0/255 masks or NaN would give a meaningless, even negative, loss)."""
    if labels.dtype == torch.bool:
        return
    values = labels.detach()
    if not bool(((values == 0) | (values == 1)).all()):
        bad = values[(values != 0) & (values != 1)]
        shown = ", ".join(f"{v:g}" for v in bad.flatten()[:5].float().tolist())
        raise ValueError(f"labels must be binary masks of 0 and 1; found other values ({shown}); "
                         "divide 0/255 masks by 255 or threshold them")


def mask_and_patch_losses(
    pred_masks: torch.Tensor, patch_logits: torch.Tensor, labels: torch.Tensor, focal_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask loss, patch loss) of the paper.

    The mask logits are upsampled bilinearly to the label size; the mask loss is
    ``lambda * focal + (1 - lambda) * dice``; the patch loss is BCE against the label max-pooled to the patch grid.
    """
    labels = _checked_labels(labels, pred_masks.dtype)
    return mask_loss_of(pred_masks, labels, focal_loss_weight), patch_loss_of(patch_logits, labels)


def _checked_labels(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Binary ``labels`` (B, [1,] H, W) as (B, 1, H, W) of ``dtype``."""
    check_binary_labels(labels)
    labels = labels.to(dtype)
    return labels.unsqueeze(1) if labels.dim() == 3 else labels


def mask_loss_of(pred_masks: torch.Tensor, labels: torch.Tensor, focal_loss_weight: float) -> torch.Tensor:
    """The paper's mask loss ``lambda * focal + (1 - lambda) * dice`` of mask logits (B, 1, h, w), upsampled
    bilinearly to the size of the binary ``labels`` (B, [1,] H, W)."""
    labels = _checked_labels(labels, pred_masks.dtype)
    logits = F.interpolate(pred_masks, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    focal = sigmoid_focal_loss(logits, labels, reduction="mean")
    return focal_loss_weight * focal + (1 - focal_loss_weight) * dice_loss(logits, labels)


def patch_loss_of(patch_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's patch loss: BCE of the patch logits (B, 1, g, g) against the binary ``labels`` (B, [1,] H, W)
    max-pooled to the patch grid."""
    labels = _checked_labels(labels, patch_logits.dtype)
    patch_targets = F.adaptive_max_pool2d(labels, patch_logits.shape[-2:])
    return F.binary_cross_entropy_with_logits(patch_logits, patch_targets)


def segmentation_loss(
    pred_masks: torch.Tensor, patch_logits: torch.Tensor, labels: torch.Tensor, config
) -> SegmentationLoss:
    """``mask + patch_loss_weight * patch`` with the weights of ``config`` (``focal_loss_weight``,
    ``patch_loss_weight``: an ``EspMedSamConfig`` or an ``EspMedSamTeacherConfig``)."""
    mask_loss, patch_loss = mask_and_patch_losses(pred_masks, patch_logits, labels, config.focal_loss_weight)
    return SegmentationLoss(mask_loss + config.patch_loss_weight * patch_loss, mask_loss, patch_loss)


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss ``model`` returns for a collated batch (``pixel_values``, ``modality``, ``labels``)."""
    return model(pixel_values=batch["pixel_values"], modality=batch["modality"], labels=batch["labels"]).loss


__all__ = [
    "SegmentationLoss",
    "batch_loss",
    "check_binary_labels",
    "dice_loss",
    "mask_and_patch_losses",
    "mask_loss_of",
    "patch_loss_of",
    "segmentation_loss",
]
