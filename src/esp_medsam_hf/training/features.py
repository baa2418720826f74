"""Training on a frozen encoder's features, computed once.

When the image encoder (the modality aggregator and the parameter bags) is frozen, its output for an image never
changes, so recomputing it every epoch is wasted work: on a CPU the encoder is over 90 % of a training step. Here
every training image is encoded once per *view* (the identity and the flips that augmentation would draw), and the
parts that still learn (the self-patch prompt generator, the query-decoupled modality decoder and the modality
classifier's head) train on the stored image embeddings and pooled classifier features. Augmentation stays exact
and seeded: each epoch draws, per image, one of its views from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..data.schema import image_to_rgb, mask_to_bool
from ..losses import segmentation_loss
from ..modeling_esp_medsam import EspMedSamModel

logger = logging.getLogger(__name__)

VIEWS = ("identity", "hflip", "vflip", "rot180")
"""The geometric views that can be cached, in the order they are taken (``feature_views`` = how many)."""


def apply_view(array: np.ndarray, view: str) -> np.ndarray:
    """``array`` (H x W [x C]) seen through ``view``."""
    if view == "hflip":
        array = array[:, ::-1]
    elif view == "vflip":
        array = array[::-1]
    elif view == "rot180":
        array = array[::-1, ::-1]
    elif view != "identity":
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    return np.ascontiguousarray(array)


def frozen_encoder_modules(model: EspMedSamModel) -> list[nn.Module]:
    """The modules whose output a feature cache stores: the aggregator and the parameter bags."""
    return [model.aggregator, model.modality_controller]


def check_encoder_frozen(model: EspMedSamModel) -> None:
    trainable = [name for module, name in zip(frozen_encoder_modules(model), ("aggregator", "modality_controller"))
                 if any(p.requires_grad for p in module.parameters())]
    if trainable:
        raise ValueError(f"cache_features needs a frozen encoder, but {', '.join(trainable)} would train; add "
                         "'encoder' to freeze")


@torch.no_grad()
def encode(model: EspMedSamModel, pixel_values: torch.Tensor, modality: torch.LongTensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings, pooled classifier features) of a batch, as the model's forward computes them."""
    stem = model.aggregator.stem(pixel_values)
    embeddings = model.aggregator.forward_stages(stem, modality, model.modality_controller)
    return embeddings, model.modality_classifier.pool(stem)


class FeatureDataset(torch.utils.data.Dataset):
    """The cached views of a ``SegmentationDataset``'s rows: per item the embeddings, pooled features, labels and
    modality of one view, drawn per epoch from ``(seed, epoch, index)`` (identity only without ``augment``)."""

    def __init__(self, embeddings: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor,
                 modality: torch.Tensor, *, augment: bool, seed: int):
        self.embeddings, self.pooled, self.labels, self.modality = embeddings, pooled, labels, modality
        self.num_images, self.num_views = embeddings.shape[0], embeddings.shape[1]
        self.augment, self.seed, self.epoch = augment, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images

    def modalities(self) -> list[int]:
        return self.modality.tolist()

    def __getitem__(self, index: int) -> dict:
        view = 0
        if self.augment and self.num_views > 1:
            view = int(np.random.default_rng([self.seed, self.epoch, int(index)]).integers(self.num_views))
        return {"image_embeddings": self.embeddings[index, view], "pooled_features": self.pooled[index, view],
                "labels": self.labels[index, view], "modality": self.modality[index]}


def collate_features(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def cache_features(model: EspMedSamModel, image_processor, dataset, *, views: int, batch_size: int = 4,
                   progress: bool = True, desc: str = "encoding") -> FeatureDataset:
    """Encode every row of ``dataset`` (a ``SegmentationDataset``) under the first ``views`` views, once."""
    from tqdm.auto import tqdm

    if not 1 <= views <= len(VIEWS):
        raise ValueError(f"feature_views must be in 1..{len(VIEWS)}, got {views}")
    check_encoder_frozen(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = [dataset.rows[i] for i in range(len(dataset))]
    items = [(image_to_rgb(row["image"]), mask_to_bool(row["mask"]), int(row["modality"])) for row in rows]
    jobs = [(i, v) for i in range(len(items)) for v in range(views)]
    embeddings: dict[tuple[int, int], torch.Tensor] = {}
    pooled: dict[tuple[int, int], torch.Tensor] = {}
    labels: dict[tuple[int, int], torch.Tensor] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="view", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = [apply_view(items[i][0], VIEWS[v]) for i, v in chunk]
        masks = [apply_view(items[i][1], VIEWS[v]).astype(np.uint8) for i, v in chunk]
        inputs = image_processor(images, segmentation_maps=masks, return_tensors="pt")
        modality = torch.tensor([items[i][2] for i, _ in chunk], device=device)
        embedding, pool = encode(model, inputs["pixel_values"].to(device), modality)
        for j, key in enumerate(chunk):
            embeddings[key], pooled[key] = embedding[j].cpu(), pool[j].float().cpu()
            labels[key] = inputs["labels"][j].float()
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)

    def stacked(table: Mapping) -> torch.Tensor:
        return torch.stack([torch.stack([table[(i, v)] for v in range(views)]) for i in range(len(items))])

    return FeatureDataset(stacked(embeddings), stacked(pooled), stacked(labels),
                          torch.tensor([item[2] for item in items]), augment=dataset.augment, seed=dataset.seed)


class EspMedSamHeads(nn.Module):
    """The parts of an ``EspMedSamModel`` that learn on cached features, as one module for ``accelerate.prepare``:
    self-patch prompt generator, query-decoupled modality decoder and the modality classifier's head. Its forward
    returns the model's loss (the same terms and weights as ``EspMedSamModel.forward`` with labels)."""

    def __init__(self, model: EspMedSamModel):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "EspMedSamHeads":
        super().train(mode)
        for module in frozen_encoder_modules(self.model):
            module.eval()
        return self

    def forward(self, image_embeddings: torch.Tensor, pooled_features: torch.Tensor, modality: torch.LongTensor,
                labels: torch.Tensor) -> torch.Tensor:
        model = self.model
        patch_logits, dense_prompt = model.prompt_generator(image_embeddings)
        pred_masks = model.mask_decoder(image_embeddings, dense_prompt, modality)
        loss, _, _ = segmentation_loss(pred_masks, patch_logits, labels, model.config)
        if model.config.modality_loss_weight > 0:
            logits = model.modality_classifier.head(pooled_features)
            loss = loss + model.config.modality_loss_weight * nn.functional.cross_entropy(logits, modality)
        return loss

    @torch.no_grad()
    def predict(self, image_embeddings: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        """Low-resolution mask logits (B, 1, h, w) from cached embeddings."""
        patch_logits, dense_prompt = self.model.prompt_generator(image_embeddings)
        return self.model.mask_decoder(image_embeddings, dense_prompt, modality)


def heads_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["image_embeddings"], batch["pooled_features"], batch["modality"], batch["labels"])
