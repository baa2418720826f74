"""Stage 1, the teacher: SAM's frozen ViT + medical tokens and MLPs + SPPG + QDMD on the source domains (mask
and patch losses), or an ESP-MedSAM model on LiteMedSAM's encoder (``init_from``)."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate.utils import set_seed
from torch import nn

from ...models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel, count_parameters
from ...models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from ..config import TeacherConfig
from ..loop import train
from .shared import StageResult, cached_feature_task, segmentation_task, source_data, write_release
from .student import apply_freeze, build_student, student_processor

logger = logging.getLogger(__name__)


def build_teacher(config: TeacherConfig) -> EspMedSamTeacherModel | EspMedSamModel:
    """The teacher of ``config``: an ESP-MedSAM model on LiteMedSAM's encoder (``init_from``), SAM weights from
    ``sam_checkpoint``, else a randomly initialised SAM ViT."""
    if config.init_from:
        return build_student(config, config.init_from)
    options = dict(num_medical_tokens=config.num_medical_tokens, focal_loss_weight=config.focal_loss_weight)
    if config.model_size == "tiny":
        teacher_config = EspMedSamTeacherConfig.tiny(image_size=config.image_size, **options)
    else:
        teacher_config = EspMedSamTeacherConfig.from_preset(config.sam_preset, image_size=config.image_size,
                                                            random_init=not config.sam_checkpoint, **options)
    if config.sam_checkpoint:
        return EspMedSamTeacherModel.from_sam_pretrained(config.sam_checkpoint, teacher_config)
    logger.warning("teacher: no sam_checkpoint given, the SAM encoder is randomly initialised (and frozen)")
    return EspMedSamTeacherModel(teacher_config)


def teacher_task(config: TeacherConfig, model: nn.Module | None = None, data: dict | None = None):
    """(task, processor, data) of stage 1."""
    data = data or source_data(config)
    model = model or build_teacher(config)
    if isinstance(model, EspMedSamModel):
        processor = student_processor(model, config.init_from)
        apply_freeze(model, config.freeze, config.frozen_encoder_stages)
        logger.info("teacher: ESP-MedSAM on %s, %d trainable of %d parameters", config.init_from,
                    count_parameters(model, True), count_parameters(model))
        if config.cache_features:
            return cached_feature_task("teacher", model, config, data, processor)
        return segmentation_task("teacher", model, config, data, processor)
    if config.cache_features or config.freeze or config.frozen_encoder_stages:
        raise ValueError("freeze, frozen_encoder_stages and cache_features apply to an ESP-MedSAM teacher (init_from), not a SAM ViT one")
    logger.info("teacher: %d trainable of %d parameters (SAM encoder frozen)",
                count_parameters(model, True), count_parameters(model))
    return segmentation_task("teacher", model, config, data)


def run_teacher(config: TeacherConfig, data: dict | None = None) -> StageResult:
    """Stage 1; the release (``output_dir/release``) is the best validation model (the final one without
    validation). Seeded with ``config.seed`` before any model is built: one seed, one result."""
    set_seed(config.seed)
    task, _, data = teacher_task(config, data=data)
    result = train(config, task)
    release = write_release(result.best_dir or result.final_dir, Path(config.output_dir))
    return StageResult("teacher", release, [result], {"validation_dice": result.best_metric}, list(data))

