"""Training on a frozen encoder prefix's features, computed once.

When the first stages of the image encoder are frozen (the stem, then TinyViT stages with their parameter bags,
or the whole encoder with its neck), their output for an image never changes, so recomputing it every step is
wasted work: on a CPU the encoder is over 90 % of a training step, its stem and first two stages over half of it.
Here every training image is encoded once per *view* (the identity and the flips that augmentation would draw) up
to the *cache point*, and the parts that still learn (the encoder's later stages, the neck, their parameter bags,
the self-patch prompt generator, the query-decoupled modality decoder and the modality classifier's head) train on
the stored features. Augmentation stays exact and seeded: each epoch draws, per image, one of its views from
``(seed, epoch, index)``.

The cache point is a number of frozen encoder stages (``frozen_encoder_stages``: 1 = the stem, the patch
embedding and MBConv stage 0 that no bag touches; 2..4 = also TinyViT stages 1..3 with their bags), or ``None``
for the whole encoder with its neck (``freeze: [encoder]``; the features are then the image embeddings).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from torch import nn

from ..models.esp_medsam.backends import inference_batch_size
from ..data.schema import image_to_rgb, mask_to_bool
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from .prompts import PromptDraw, prompted_loss

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


def frozen_prefix_modules(model: EspMedSamModel, frozen_stages: int | None) -> list[nn.Module]:
    """The modules whose output a feature cache stores: the first ``frozen_stages`` encoder stages (stage 0 = patch
    embedding and MBConv stage) with those stages' blocks of every parameter bag; None: the whole encoder."""
    aggregator = model.aggregator
    if frozen_stages is None:
        return [aggregator, model.modality_controller]
    check_frozen_stages(model, frozen_stages)
    stages = list(aggregator.stages[: frozen_stages - 1])
    blocks = sum(len(stage.blocks) for stage in stages)
    bag_blocks = [block for bag in model.modality_controller.bags for block in bag.blocks[:blocks]]
    return [aggregator.patch_embed, aggregator.stage0, *stages, *bag_blocks]


def check_frozen_stages(model: EspMedSamModel, frozen_stages: int) -> None:
    """``frozen_stages`` must name a cache point inside the encoder: 1 (the stem) .. the number of stages."""
    count = len(model.aggregator.stages) + 1
    if not 1 <= frozen_stages <= count:
        raise ValueError(f"frozen_encoder_stages must be in 1..{count} for this model (stage 0 is the stem), got "
                         f"{frozen_stages}")


def check_prefix_frozen(model: EspMedSamModel, frozen_stages: int | None) -> None:
    trainable = [type(module).__name__ for module in frozen_prefix_modules(model, frozen_stages)
                 if any(p.requires_grad for p in module.parameters())]
    if trainable:
        what = "the encoder" if frozen_stages is None else f"the first {frozen_stages} encoder stage(s)"
        raise ValueError(f"cache_features needs {what} frozen, but {', '.join(sorted(set(trainable)))} would train; "
                         "add 'encoder' to freeze or set frozen_encoder_stages")


@torch.no_grad()
def encode(model: EspMedSamModel, pixel_values: torch.Tensor, modality: torch.LongTensor,
           frozen_stages: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features at the cache point, pooled classifier features) of a batch, as the model's forward computes
    them: the image embeddings when ``frozen_stages`` is None, else the output of stage ``frozen_stages - 1``."""
    hidden_states: list[torch.Tensor] = []
    last = None if frozen_stages is None else frozen_stages - 1
    features = model.encode(pixel_values, modality, hidden_states, last_stage=last)[0]
    return features, model.modality_classifier.pool(hidden_states[0])


def shown_view(index: int, epoch: int, num_views: int, *, augment: bool, seed: int) -> int:
    """The view image ``index`` shows in ``epoch``: every view once per ``num_views`` epochs, in an order drawn per
    image from ``(seed, index)`` (view 0 without ``augment``)."""
    if not augment or num_views == 1:
        return 0
    order = np.random.default_rng([seed, int(index)]).permutation(num_views)
    return int(order[epoch % num_views])


class FeatureDataset(torch.utils.data.Dataset):
    """The cached views of a ``SegmentationDataset``'s rows: per item the features at the cache point, pooled
    classifier features, labels and modality of one view: each image shows its views in turn, one per epoch, in an
    order drawn from ``(seed, index)`` (identity only without ``augment``)."""

    def __init__(self, features: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor,
                 modality: torch.Tensor, *, augment: bool, seed: int, encoded: torch.Tensor | None = None):
        self.features, self.pooled, self.labels, self.modality = features, pooled, labels, modality
        self.num_images, self.num_views = features.shape[0], features.shape[1]
        self.augment, self.seed, self.epoch = augment, seed, 0
        # (images, views) bool: which views were encoded (``shown_views``); the others hold zeros and are never served
        self.encoded = encoded if encoded is not None else torch.ones(self.num_images, self.num_views, dtype=torch.bool)

    def view_of(self, index: int, epoch: int) -> int:
        return shown_view(index, epoch, self.num_views, augment=self.augment, seed=self.seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_images

    def modalities(self) -> list[int]:
        return self.modality.tolist()

    def __getitem__(self, index: int) -> dict:
        view = self.view_of(index, self.epoch)
        if not bool(self.encoded[index, view]):
            raise RuntimeError(f"view {view} of image {index} was not encoded: the cache was built for fewer epochs "
                               f"than epoch {self.epoch} (cache_features' epochs)")
        return {"features": self.features[index, view], "pooled_features": self.pooled[index, view],
                "labels": self.labels[index, view], "modality": self.modality[index]}


def collate_features(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def cache_features(model: EspMedSamModel, image_processor, dataset, *, views: int, frozen_stages: int | None = None,
                   batch_size: int | None = None, bf16: bool = False, progress: bool = True,
                   desc: str = "encoding", epochs: int | None = None) -> FeatureDataset:
    """Encode every row of ``dataset`` (a ``SegmentationDataset``) under the first ``views`` views, once, up to the
    cache point ``frozen_stages`` (None: the whole encoder), ``batch_size`` images at a time (default:
    ``backends.inference_batch_size`` of the model's device); ``bf16``: under bfloat16 autocast (the training's
    mixed precision; on a CPU with AMX about 40 % less time, features within about 2 % of their largest value),
    stored in float32 either way. Under ``accelerate launch`` every process encodes its share of the views
    (``split_between_processes``) and all of them get every feature (``gather_object``): each trains on the whole
    cache. ``epochs``: how many epochs will train on the cache (``None``: any number); a view no image shows in those
    epochs is not encoded (a run shorter than ``views`` epochs would only waste its encoding)."""
    from tqdm.auto import tqdm

    scaled = getattr(dataset, "scale_augmentation", None) is not None
    if views < 1 or (not scaled and views > len(VIEWS)):
        raise ValueError(f"feature_views must be in 1..{len(VIEWS)} (any number >= 1 with zoom), got {views}")
    check_prefix_frozen(model, frozen_stages)
    # the prefix is frozen: an inference-optimized copy computes its output (the model itself keeps training)
    encoder = copy.deepcopy(model).optimize_for_inference()
    device = next(model.parameters()).device
    batch_size = batch_size or inference_batch_size(device)
    if scaled:
        def view_of(i: int, v: int) -> tuple[np.ndarray, np.ndarray]:
            return dataset.scaled_view(i, v)[:2]

        modalities = [int(m) for m in dataset.modalities()]
    else:
        rows = [dataset.rows[i] for i in range(len(dataset))]
        items = [(image_to_rgb(row["image"]), mask_to_bool(row["mask"])) for row in rows]
        modalities = [int(row["modality"]) for row in rows]

        def view_of(i: int, v: int) -> tuple[np.ndarray, np.ndarray]:
            return apply_view(items[i][0], VIEWS[v]), apply_view(items[i][1], VIEWS[v])

    used = None if epochs is None else {
        (i, shown_view(i, epoch, views, augment=dataset.augment, seed=dataset.seed))
        for i in range(len(modalities)) for epoch in range(epochs)}
    every_job = [(i, v) for i in range(len(modalities)) for v in range(views) if used is None or (i, v) in used]
    state = PartialState()
    with state.split_between_processes(every_job) as jobs:
        jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="view", disable=not progress or not state.is_local_main_process)
    features, pooled, labels = _encode_views(encoder, image_processor, view_of, modalities, jobs, frozen_stages,
                                             batch_size=batch_size, bf16=bf16, bar=bar, desc=desc)
    bar.close()
    del encoder
    if state.num_processes > 1:
        shared = gather_object([(key, features[key], pooled[key], labels[key]) for key in jobs])
        for key, feature, pool, label in shared:
            features[tuple(key)], pooled[tuple(key)], labels[tuple(key)] = feature, pool, label

    def stacked(table: Mapping) -> torch.Tensor:
        blank = torch.zeros_like(next(iter(table.values())))
        return torch.stack([torch.stack([table.get((i, v), blank) for v in range(views)])
                            for i in range(len(modalities))])

    encoded = torch.tensor([[used is None or (i, v) in used for v in range(views)] for i in range(len(modalities))])
    return FeatureDataset(stacked(features), stacked(pooled), stacked(labels), torch.tensor(modalities),
                          augment=dataset.augment, seed=dataset.seed, encoded=encoded)


def _encode_views(encoder: EspMedSamModel, image_processor, view_of, modalities: list[int], jobs: list,
                  frozen_stages: int | None, *, batch_size: int, bf16: bool, bar,
                  desc: str) -> tuple[dict, dict, dict]:
    """Features, pooled features and labels of the ``(image, view)`` ``jobs``, ``batch_size`` at a time; the time
    taken is logged (the record's ``encoding_seconds``: ``scripts/benchmark_stage3.py`` reads it)."""
    began = time.perf_counter()
    device = next(encoder.parameters()).device
    features: dict[tuple[int, int], torch.Tensor] = {}
    pooled: dict[tuple[int, int], torch.Tensor] = {}
    labels: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        pairs = [view_of(i, v) for i, v in chunk]
        images = [image for image, _ in pairs]
        masks = [mask.astype(np.uint8) for _, mask in pairs]
        inputs = image_processor(images, segmentation_maps=masks, return_tensors="pt")
        modality = torch.tensor([modalities[i] for i, _ in chunk], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            feature, pool = encode(encoder, inputs["pixel_values"].to(device), modality, frozen_stages)
        for j, key in enumerate(chunk):
            features[key], pooled[key] = feature[j].float().cpu().contiguous(), pool[j].float().cpu()
            labels[key] = inputs["labels"][j].float()
        bar.update(len(chunk))
    seconds = time.perf_counter() - began
    logger.info("%s: %d views of %d images in %.1f s", desc, len(jobs), len(modalities), seconds,
                extra={"encoding_seconds": seconds})
    return features, pooled, labels


class EspMedSamAfterCache(nn.Module):
    """The parts of an ``EspMedSamModel`` that learn on cached features, as one module for ``accelerate.prepare``:
    the encoder's stages after the cache point with their bags and the neck (none when the whole encoder is frozen),
    the self-patch prompt generator, the query-decoupled modality decoder and the modality classifier's head. Its
    forward returns the model's loss (the same terms and weights as ``EspMedSamModel.forward`` with labels)."""

    def __init__(self, model: EspMedSamModel, frozen_stages: int | None = None):
        super().__init__()
        self.model, self.frozen_stages = model, frozen_stages

    def train(self, mode: bool = True) -> "EspMedSamAfterCache":
        super().train(mode)
        for module in frozen_prefix_modules(self.model, self.frozen_stages):
            module.eval()
        return self

    def embed(self, features: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        """Image embeddings from features at the cache point."""
        if self.frozen_stages is None:
            return features
        return self.model.encode_stages(features, modality, first=self.frozen_stages)

    def forward(self, features: torch.Tensor, pooled_features: torch.Tensor, modality: torch.LongTensor,
                labels: torch.Tensor, prompt: PromptDraw | None = None) -> torch.Tensor:
        """The loss of a batch; with ``prompt`` the prompted batch's (``training.prompts.prompted_loss``, decoded
        from the image embeddings of the cached features)."""
        model = self.model
        if prompt is None:
            loss = model.decode_embeddings(self.embed(features, modality), modality, labels).loss
        else:
            loss = prompted_loss(model, self.embed(features, modality), modality, labels, prompt)
        if model.config.modality_loss_weight > 0:
            logits = model.modality_classifier.head(pooled_features)
            loss = loss + model.config.modality_loss_weight * nn.functional.cross_entropy(logits, modality)
        return loss

    @torch.no_grad()
    def predict(self, features: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        """Low-resolution mask logits (B, 1, h, w) from cached features."""
        return self.model.decode_embeddings(self.embed(features, modality), modality).pred_masks


def cached_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["features"], batch["pooled_features"], batch["modality"], batch["labels"])
