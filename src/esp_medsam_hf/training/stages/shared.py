"""What the three stages share: the stage result, the processor, the source data, the Dice validation, the
segmentation task (on images or on cached encoder features) and the release folder."""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn

from ...models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
from ...models.esp_medsam.losses import batch_loss
from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ...models.esp_medsam.pipeline_esp_medsam import save_pretrained_with_pipeline
from ...models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from ..augment import crops_per_epoch, training_augmentation
from ..config import RELEASE, TrainingConfig, resolve_mixed_precision
from ..data import Collator, SegmentationDataset, check_not_empty, load_domains
from ..features import EspMedSamAfterCache, cache_features, cached_loss, collate_features
from ..loop import StageTask, TrainingResult

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage produced: ``release_dir`` is the folder to publish (model, processor)."""

    stage: str
    release_dir: Path
    results: list[TrainingResult]
    metrics: dict
    domains: list[str] = field(default_factory=list)  # the training domains (for the model card)


def make_processor(image_size: int, modality_names) -> EspMedSamProcessor:
    image_processor = EspMedSamImageProcessor(size={"height": image_size, "width": image_size})
    return EspMedSamProcessor(image_processor, modality_names=list(modality_names))


def save_with_processor(model: nn.Module, processor: EspMedSamProcessor, folder: Path) -> None:
    """``save_pretrained`` of the model and processor, plus preprocessor_config.json for the stock pipeline; a
    student folder also carries the "medical-image-segmentation" pipeline as remote code."""
    if isinstance(model, EspMedSamModel):
        processor.target_names = model.config.all_target_names  # target= names what the model decodes
        save_pretrained_with_pipeline(model, processor, folder)
        return
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)


def freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> None:
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)


def source_data(config: TrainingConfig) -> dict:
    """The training domains with ``train`` and ``validation`` splits; empty domains are an error."""
    splits = {"train": config.synthetic_train_images, "validation": config.synthetic_valid_images}
    data = load_domains(config.data, config.domains, splits=splits, seed=config.seed, size=config.image_size)
    check_not_empty(data, "train")
    return data


def dice_validation(model: nn.Module, processor: EspMedSamProcessor, data: dict, config: TrainingConfig,
                    target: int | None = None) -> dict:
    """Mean validation Dice (%) over the domains, with ``data.evaluation.evaluate_model`` (decoding ``target`` for
    every image when given); with a ``zoom``, on zoom views instead (:func:`zoom_view_validation`)."""
    from ...data.evaluation import evaluate_model

    usable = {name: dataset for name, dataset in data.items() if len(dataset["validation"])}
    if not usable:
        return {"dice": float("nan")}
    if config.zoom:
        return zoom_view_validation(model, processor, usable, config, target)
    report = evaluate_model(
        model, processor, usable, split="validation",
        compute_hausdorff=False, max_images=config.validation_images, progress=False, target=target,
    )
    per_domain = {f"dice/{name}": row["dice"] for name, row in report["domains"].items()}
    return {"dice": float(np.mean(list(per_domain.values()))), **per_domain}


def zoom_view_validation(model: EspMedSamModel, processor: EspMedSamProcessor, data: dict, config: TrainingConfig,
                         target: int | None = None) -> dict:
    """Mean Dice (%) over the domains of ``VALIDATION_ZOOM_VIEWS`` zoom views of each validation image at the model's
    input size (the views a feature cache validates on: drawn once from the seed, no photometric change), decoding
    ``target`` when given. Without it a run trained on zoom views was validated on whole images at the processor's
    scale, which it never saw: the optic disc, trained at 0.2-0.35x, scored 0 on whole photographs tiled at their
    native resolution while it learnt."""
    from ...metrics.functional import dice_score

    zoom = training_augmentation(config, processor.image_processor, photometric=False)
    rows = SegmentationDataset(data, "validation", augment=True, seed=config.seed, scale_augmentation=zoom)
    collate, device = Collator(processor.image_processor), next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {}
    with torch.no_grad():
        for index, domain in enumerate(rows.rows["domain"]):
            views = [rows.scaled_view(index, view) for view in range(VALIDATION_ZOOM_VIEWS)]
            batch = collate([{"image": image, "mask": mask, "modality": modality} for image, mask, modality in views])
            chosen = ({"modality": batch["modality"]} if target is None
                      else {"target": torch.full_like(batch["modality"], target)})
            logits = model(pixel_values=batch["pixel_values"].to(device), **{k: v.to(device) for k, v in chosen.items()})
            masks = F.interpolate(logits.pred_masks.float().cpu(), size=batch["labels"].shape[-2:], mode="bilinear") > 0
            scores.setdefault(domain, []).extend(dice_score(m[0].numpy(), l[0].numpy() > 0)
                                                 for m, l in zip(masks, batch["labels"]))
    model.train(was_training)
    per_domain = {f"dice/{name}": float(np.mean(values)) for name, values in scores.items()}
    return {"dice": float(np.mean(list(per_domain.values()))), **per_domain}


def segmentation_task(name: str, model: nn.Module, config: TrainingConfig, data: dict,
                      processor: EspMedSamProcessor | None = None):
    """(task, processor, data) of a stage trained with the segmentation loss and validated by Dice (1 and 3)."""
    processor = processor or make_processor(model.config.image_size, model.config.modality_names)
    task = StageTask(
        name=name,
        model=model,
        train_dataset=SegmentationDataset(data, "train", augment=config.augment, seed=config.seed,
                                          repeats=crops_per_epoch(config.zoom),
                                          scale_augmentation=training_augmentation(config, processor.image_processor)),
        collate_fn=Collator(processor.image_processor),
        compute_loss=batch_loss,
        save=lambda m, folder: save_with_processor(m, processor, folder),
        validate=lambda m: dice_validation(m, processor, data, config),
    )
    return task, processor, data



VALIDATION_ZOOM_VIEWS = 3
"""With ``zoom``, validation scores this many zoom views of each validation image (drawn once from the seed, no
photometric change), so that the best checkpoint is the best across object sizes, not at one."""


def epochs_at_most(config: TrainingConfig, num_images: int) -> int:
    """An upper bound of the epochs a run of ``config`` on ``num_images`` images takes (``max_steps`` may end it
    early): its views beyond are never shown, so not encoded. Each process's share of the batches is rounded down,
    so the bound holds however accelerate rounds it."""
    if config.max_steps is None:
        return config.epochs
    batches = math.ceil(num_images / config.batch_size)
    per_process = max(1, batches // PartialState().num_processes)
    steps_per_epoch = max(1, per_process // config.gradient_accumulation_steps)
    return min(config.epochs, math.ceil(config.max_steps / steps_per_epoch))


def cached_feature_task(name: str, model: EspMedSamModel, config: TrainingConfig, data: dict,
                        processor: EspMedSamProcessor, trainable: EspMedSamAfterCache | None = None):
    """(task, processor, data) of a segmentation stage on a frozen encoder prefix's cached features
    (:mod:`esp_medsam_hf.training.features`); validation Dice (%) on cached validation features at model size
    (whole images, or with ``zoom`` ``VALIDATION_ZOOM_VIEWS`` zoom views of each). ``trainable``: what learns on
    the features (default ``EspMedSamAfterCache(model, config.cache_point)``)."""
    point = config.cache_point
    train_rows = SegmentationDataset(data, "train", augment=config.augment, seed=config.seed,
                                     repeats=crops_per_epoch(config.zoom),
                                     scale_augmentation=training_augmentation(config, processor.image_processor))
    views = config.feature_views if config.augment else 1
    bf16 = resolve_mixed_precision(config.mixed_precision) == "bf16"
    features = cache_features(model, processor.image_processor, train_rows, views=views, frozen_stages=point,
                              bf16=bf16, progress=config.progress, desc=f"{name}: encoding training images",
                              epochs=epochs_at_most(config, len(train_rows)))
    usable = {n: d for n, d in data.items() if len(d["validation"])}
    validation = None
    if usable and config.validate:
        zoom = training_augmentation(config, processor.image_processor, photometric=False) if config.zoom else None
        rows = SegmentationDataset(usable, "validation", augment=zoom is not None, seed=config.seed,
                                   scale_augmentation=zoom)
        validation = cache_features(model, processor.image_processor, rows,
                                    views=VALIDATION_ZOOM_VIEWS if zoom is not None else 1, frozen_stages=point,
                                    bf16=bf16, progress=config.progress, desc=f"{name}: encoding validation images")
    trainable = trainable or EspMedSamAfterCache(model, point)

    def validate(module: EspMedSamAfterCache) -> dict:
        from ...metrics.functional import dice_score

        was_training = module.training
        module.eval()
        scores = []
        for view in range(validation.num_views):
            for start in range(0, validation.num_images, 16):
                logits = module.predict(validation.features[start : start + 16, view],
                                        validation.modality[start : start + 16])
                labels = validation.labels[start : start + 16, view]
                masks = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear") > 0
                scores += [dice_score(m[0].numpy(), l[0].numpy() > 0) for m, l in zip(masks, labels)]
        module.train(was_training)
        return {"dice": float(np.mean(scores))}

    task = StageTask(
        name=name,
        model=trainable,
        train_dataset=features,
        collate_fn=collate_features,
        compute_loss=cached_loss,
        save=lambda m, folder: save_with_processor(m.model, processor, folder),
        validate=validate if validation is not None else None,
    )
    return task, processor, data



def write_release(chosen: Path, output_dir: Path, build=None) -> Path:
    """``output_dir/release``: a copy of ``chosen`` (or what ``build(staging)`` writes), replaced atomically, by the
    main process only under ``accelerate launch``."""
    from ...models.esp_medsam.fileio import staging_directory

    release = Path(output_dir) / RELEASE
    state = PartialState()
    if state.is_main_process:
        with staging_directory(release) as staging:
            if build is not None:
                build(staging)
            if not (staging / "config.json").is_file():
                shutil.copytree(chosen, staging, dirs_exist_ok=True)
    state.wait_for_everyone()
    return release

