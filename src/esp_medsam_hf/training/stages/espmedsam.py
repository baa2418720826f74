"""Stage 3, ESP-MedSAM: the distilled encoder with SPPG and QDMD on the source domains; the modality classifier
trains jointly through the model's loss, and may be fitted again alone on more domains for the release."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ...models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from ..config import KEEP_OTHERS_WEIGHT, SHARED_LR_SCALE, EspMedSamStageConfig
from ..data import check_not_empty, load_domains
from ..features import FeatureDataset
from ..loop import train
from ..prompts import add_prompts
from .modality_classifier import fit_modality_classifier
from ..augment import parse_zoom
from ..calibration import calibrate_object_size, native_long_sides
from ...data.domains import MODALITY_NAMES
from ...data.prepared import prepared_domain_spec, prepared_names
from ..modalities import add_modality_to_processor, domains_modality, prepare_modality
from ..norms import freeze_norms
from ..targets import (TargetAfterCache, TargetTraining, domains_target, freeze_target_prefix, prepare_target,
                       target_parameters)
from .shared import (StageResult, cached_feature_task, dice_validation, save_with_processor, segmentation_task,
                     source_data, write_release)
from .student import apply_freeze, build_student, student_processor

logger = logging.getLogger(__name__)


def espmedsam_task(config: EspMedSamStageConfig, model: EspMedSamModel | None = None, data: dict | None = None):
    """(task, processor, data) of stage 3: everything but the ``freeze`` parts trains (the modality classifier on
    detached features); with ``cache_features`` the frozen encoder's features are computed once; with
    ``prompt_fraction`` that share of the batches is prompted (``training.prompts``)."""
    data = data or source_data(config)
    processor = student_processor(model, None) if model is not None else None
    model = model if model is not None else build_student(config, config.init_from)
    processor = processor or student_processor(model, config.init_from)
    config = with_domains_target(config)
    if config.new_target is not None:
        return new_target_task(config, model, data, processor)
    if config.new_modality is not None:
        return new_modality_task(config, model, data, processor)
    apply_freeze(model, config.freeze, config.frozen_encoder_stages, prompts=config.prompt_fraction > 0)
    if config.cache_features:
        task, processor, data = cached_feature_task("espmedsam", model, config, data, processor)
    else:
        task, processor, data = segmentation_task("espmedsam", model, config, data, processor)
    if config.prompt_fraction > 0:
        add_prompts(task, config)
    return task, processor, data


def with_domains_target(config: EspMedSamStageConfig) -> EspMedSamStageConfig:
    """``config`` with the new target that its prepared training domains record (``target`` in ``domain.json``)
    when it names none; a different ``new_target`` than they record is an error."""
    if config.data == "synthetic":
        return config
    names = prepared_names(config.data, config.domains)
    specs = {name: prepared_domain_spec(config.data, name) for name in names}
    modality = domains_modality(specs)
    if modality is not None:
        return with_domains_modality(config, *modality)
    recorded = domains_target(specs)
    if recorded is None:
        return config
    if config.new_modality is not None:
        own = config.new_modality_target or config.new_modality
        if recorded[0] != own:
            raise ValueError(f"the training domains record the target {recorded[0]!r}, not {own!r}, which "
                             f"--new-modality {config.new_modality!r} segments (give --new-modality-target)")
        return config
    if config.new_target is None:
        logger.info("the training domains record the target %r (%s): training it as a new target", *recorded)
        return dataclasses.replace(config, new_target=recorded[0], target_modality=recorded[1])
    if (config.new_target, config.target_modality) != recorded:
        raise ValueError(f"--new-target {config.new_target!r} --modality {config.target_modality} differs from the "
                         f"target the training domains record: {recorded[0]!r} ({recorded[1]})")
    return config


def with_domains_modality(config: EspMedSamStageConfig, name: str, like: str, target: str | None):
    """``config`` with the new modality its training domains record (``new_modality`` in ``domain.json``, prepared
    as ``like``); another ``new_modality`` (or ``like``, target) given, or a ``new_target``, is an error."""
    if config.new_target is not None:
        raise ValueError(f"the training domains record the new modality {name!r}; --new-target adds a target to a "
                         "modality the model has: leave it out")
    if config.new_modality is None:
        logger.info("the training domains record the new modality %r (like %s): adding it", name, like)
        return dataclasses.replace(config, new_modality=name, like_modality=like, new_modality_target=target)
    given = (config.new_modality, config.like_modality, config.new_modality_target or config.new_modality)
    if given != (name, like, target or name):
        raise ValueError(f"--new-modality {config.new_modality!r} --like {config.like_modality} differs from what the "
                         f"training domains record: {name!r} like {like} (target {target or name!r})")
    return config


def new_target_task(config: EspMedSamStageConfig, model: EspMedSamModel, data: dict, processor: EspMedSamProcessor):
    """(task, processor, data) of training ``config.new_target``: every training image is decoded as that target, and
    validated as it; with ``only_new_target`` only its bag and query train (else what ``freeze`` leaves). With
    ``cache_features`` and ``only_new_target`` the encoder up to ``frozen_encoder_stages`` (the target's bag blocks
    there included, kept the modality's) is encoded once and only the rest of its bag and its query train."""
    model = prepare_target(model, config.new_target, config.target_modality, config.only_new_target)
    return one_target_task(config, model, model.config.target_index(config.new_target), data, processor)


def new_modality_task(config: EspMedSamStageConfig, model: EspMedSamModel, data: dict,
                      processor: EspMedSamProcessor):
    """(task, processor, data) of training ``config.new_modality`` (added like ``config.like_modality``): every
    training image is decoded as that modality, as ``new_target_task`` decodes a target; its classifier class does
    not train (``training.modalities.ADDED_CLASS_LOGIT_OFFSET``). With ``cache_features`` the domains must record
    the ``like`` modality (the cache encodes each image with its recorded modality's bag)."""
    model = prepare_modality(model, config.new_modality, config.like_modality, config.new_modality_target,
                             config.only_new_target)
    add_modality_to_processor(processor, model.config)
    like = model.config.modality_index(config.like_modality)
    if config.cache_features and config.only_new_target:
        recorded = {MODALITY_NAMES[int(m)] for d in data.values() for m in d["train"]["modality"]}
        if recorded != {config.like_modality}:
            raise ValueError(f"with cache_features the training domains must be prepared as {config.like_modality!r} "
                             f"images (--like), they record {sorted(recorded)}: prepare them with --modality "
                             f"{config.like_modality} or train without --cache-features")
    return one_target_task(config, model, model.config.modality_index(config.new_modality), data, processor,
                           source=like)


TRAIN_ALL_FROZEN = ("modality_classifier", "prompt_generator")
"""Shared parts that stay frozen when a new target or modality trains with everything else (``only_new_target``
False), as do the batch norms (weights and statistics). The classifier: the new images are all of one modality,
so it could only learn to call every image that one, and it routes every other modality's images. The self-patch
prompt generator, one for all targets: training the optic disc with it (lr 1e-3 and 1e-4) the loss fell from 1.5 to
0.55 in four steps and stayed there, every disc logit of a test photograph near -2 (Dice 0); kept frozen, with the
batch norms, the same run reached validation Dice 94.8 and 87.8 on the test photographs. The batch norms: every
modality normalises with their statistics, and a few images' small batches moved them (``training.norms``)."""


def one_target_task(config: EspMedSamStageConfig, model: EspMedSamModel, target: int, data: dict,
                    processor: EspMedSamProcessor, source: int | None = None):
    """(task, processor, data) of training ``model`` on every image as ``target`` (a new target's or modality's;
    ``source``: the bag a feature cache encodes its images with, see ``freeze_target_prefix``); with everything
    training (not ``only_new_target``), ``TRAIN_ALL_FROZEN`` and the batch norms stay frozen beside ``config.freeze``."""
    if not config.only_new_target:
        apply_freeze(model, [*config.freeze, *TRAIN_ALL_FROZEN], config.frozen_encoder_stages)
        logger.info("training all but %s and the %d batch norms", ", ".join(TRAIN_ALL_FROZEN), freeze_norms(model))
        if config.cache_features:
            logger.warning("cache_features is not used with the shared parts training (--train-all): the encoder "
                           "changes every step, so every step encodes its images")
    if config.cache_features and config.only_new_target:
        freeze_target_prefix(model, target, config.cache_point, source)
        return cached_feature_task("espmedsam", model, config, data, processor,
                                   trainable=TargetAfterCache(model, config.cache_point, target))
    kept = source if source is not None else model.config.target_modalities[target]  # the nearest old target
    keep = KEEP_OTHERS_WEIGHT if config.keep_others_weight is None else config.keep_others_weight
    training = TargetTraining(model, target, config.only_new_target, keep, kept)
    task, processor, data = segmentation_task("espmedsam", training, config, data, processor)
    if not config.only_new_target:
        own = {id(p) for p in target_parameters(model, target)}
        scale = SHARED_LR_SCALE if config.shared_lr_scale is None else config.shared_lr_scale
        task.lr_scales = [([p for p in model.parameters() if id(p) not in own], scale)]
    task.compute_loss = lambda module, batch: module(batch["pixel_values"], batch["labels"])
    task.save = lambda module, folder: save_with_processor(module.model, processor, folder)
    task.validate = lambda module: dice_validation(module.model, processor, data, config, target=target)
    return task, processor, data


def run_espmedsam(config: EspMedSamStageConfig, model: EspMedSamModel | None = None,
                  data: dict | None = None, classifier_data: dict | None = None) -> StageResult:
    """Stage 3; the release (``output_dir/release``) is the best validation model (the final one without
    validation), with the modality classifier fitted on ``classifier_domains`` (or ``classifier_data``, already
    loaded domains) when asked. Seeded with ``config.seed`` before any model is built."""
    set_seed(config.seed)
    config = with_domains_target(config)
    task, processor, data = espmedsam_task(config, model, data)
    result = train(config, task)
    chosen = result.best_dir or result.final_dir
    metrics: dict = {"validation_dice": result.best_metric}
    fitted: dict = {}
    known = None
    if isinstance(task.train_dataset, FeatureDataset) and classifier_data is not None:
        # the stem is frozen below a feature cache: its pooled features of the training images are still right
        cache = task.train_dataset
        encoded = cache.encoded.flatten()  # the views the run showed (the others were not encoded)
        known = (cache.pooled.flatten(0, 1)[encoded], cache.modality.repeat_interleave(cache.num_views)[encoded])
        classifier_data = {name: domain for name, domain in classifier_data.items() if name not in data}

    def build(staging: Path) -> None:
        fitted.update(_fit_classifier_into(config, chosen, staging, processor, classifier_data, known))
        fitted.update(_calibrate_into(config, chosen, staging, processor, data))

    release = write_release(chosen, Path(config.output_dir), build)
    metrics.update(fitted)
    return StageResult("espmedsam", release, [result], metrics, list(data))


def _calibrate_into(config: EspMedSamStageConfig, chosen: Path, staging: Path, processor: EspMedSamProcessor,
                    data: dict) -> dict:
    """Choose the "auto" object size and the mask threshold on the validation images (``training.calibration``)
    when asked and the ``zoom`` has object-size domains, and the long side at which "auto" tiles the modalities of
    its scale domains; the processor in ``staging`` (a copy of ``chosen`` if nothing is there yet) gets them.
    Returns the metrics (the choices and each candidate's validation Dice)."""
    zoom = parse_zoom(config.zoom)
    if config.new_target is not None or config.new_modality is not None or not zoom:
        return {}
    if not (staging / "config.json").is_file():
        shutil.copytree(chosen, staging, dirs_exist_ok=True)
    metrics: dict = {}
    sides = native_long_sides(data, zoom)
    if sides:
        processor.image_processor.modality_long_sides = {**(processor.image_processor.modality_long_sides or {}),
                                                         **sides}
        processor.save_pretrained(staging)
        processor.image_processor.save_pretrained(staging)
        logger.info("auto inference tiles %s at a long side of %s px (their training resolution)",
                    ", ".join(sides), ", ".join(str(side) for side in sides.values()))
        metrics["long_sides"] = sides
    zoom = {name: spec for name, spec in zoom.items() if spec.kind == "object_size"}
    if not (config.calibrate_object_size and zoom):
        return metrics
    model = EspMedSamModel.from_pretrained(staging).optimize_for_inference()
    with torch.no_grad():
        found = calibrate_object_size(model, processor, data, zoom)
    if found is None:
        return metrics
    processor.image_processor.modality_object_sizes = {
        **(processor.image_processor.modality_object_sizes or {}),
        **{name: found["object_size"] for name in found["modalities"]}}
    processor.image_processor.modality_mask_thresholds = {
        **(processor.image_processor.modality_mask_thresholds or {}),
        **{name: found["mask_threshold"] for name in found["modalities"]}}
    processor.image_processor.modality_min_object_fractions = {
        **(processor.image_processor.modality_min_object_fractions or {}),
        **{name: found["min_object_fraction"] for name in found["modalities"]}}
    processor.save_pretrained(staging)
    processor.image_processor.save_pretrained(staging)
    logger.info("auto inference object size for %s: %.1f px (validation Dice %s)", ", ".join(found["modalities"]),
                found["object_size"], ", ".join(f"{size:g} px {dice:.2f}%" for size, dice in found["candidates"].items()))
    return {**metrics, "object_size": found["object_size"], "mask_threshold": found["mask_threshold"],
            "object_size_validation_dice": {f"{size:g}": dice for size, dice in found["candidates"].items()},
            "mask_threshold_validation_dice": {f"{cut:g}": dice for cut, dice in found["thresholds"].items()},
            "min_object_fraction": found["min_object_fraction"],
            "small_bodies_validation_dice": {f"{fraction:.3g}": dice for fraction, dice in found["small_bodies"].items()}}


def _fit_classifier_into(config: EspMedSamStageConfig, chosen: Path, staging: Path, processor: EspMedSamProcessor,
                         classifier_data: dict | None, known: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Fit the modality classifier of ``chosen`` when asked (``known``: pooled features already computed) and save
    the model into ``staging``."""
    metrics: dict = {}
    if (config.classifier_domains or classifier_data or known) and config.classifier_epochs:
        best = EspMedSamModel.from_pretrained(chosen)
        if classifier_data is None:
            classifier_data = load_domains(
                config.data, config.classifier_domains, splits={"train": config.synthetic_train_images},
                seed=config.seed, size=config.image_size,
            )
        if known is None:
            check_not_empty(classifier_data, "train")
        fit = fit_modality_classifier(best, processor, classifier_data, epochs=config.classifier_epochs,
                                      seed=config.seed, progress=config.progress, known=known)
        metrics["classifier_train_accuracy"] = fit["accuracy"]
        logger.info("modality classifier fitted on %d images of %d domains: %.2f%% training accuracy",
                    fit["images"], len(classifier_data), fit["accuracy"])
        save_with_processor(best, processor, staging)
    return metrics
