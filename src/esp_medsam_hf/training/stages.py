"""The three training stages of ESP-MedSAM as ``StageTask``s for the loop, and ``run_stage`` to run one.

- teacher: SAM's frozen ViT + medical tokens and MLPs + SPPG + QDMD on the source domains (mask and patch losses).
- distill (MMDKD): modality-common (the student's aggregator learns the frozen SAM encoder's embeddings on natural
  photographs, parameter bags unplugged) then modality-specific (bag m learns the medical teacher's embeddings on
  modality m, aggregator frozen; bags of modalities absent from a step get no gradient at all, so Adam leaves them
  alone). MSE on the embeddings.
- espmedsam: the distilled encoder with SPPG and QDMD on the source domains; the modality classifier trains jointly
  through the model's loss.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import set_seed
from torch import nn

from ..models.esp_medsam.backends import inference_batch_size
from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ..models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from ..models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
from ..models.esp_medsam.losses import batch_loss
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel, GatheredBagBlock, count_parameters
from ..models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from ..models.esp_medsam.pipeline_esp_medsam import save_pretrained_with_pipeline
from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from .config import RELEASE, DistillConfig, EspMedSamStageConfig, TeacherConfig, TrainingConfig, expand_freeze
from .data import (
    Collator,
    NaturalImageDataset,
    SegmentationDataset,
    TrainingDataError,
    check_not_empty,
    load_domains,
    load_natural_images,
)
from .augment import training_augmentation
from .features import (
    EspMedSamAfterCache,
    FeatureDataset,
    cache_features,
    cached_loss,
    collate_features,
    frozen_prefix_modules,
)
from .loop import StageTask, TrainingResult, train

logger = logging.getLogger(__name__)


@dataclass
class StageResult:
    """What a stage produced: ``release_dir`` is the folder to publish (model, processor)."""

    stage: str
    release_dir: Path
    results: list[TrainingResult]
    metrics: dict


def make_processor(image_size: int, modality_names) -> EspMedSamProcessor:
    image_processor = EspMedSamImageProcessor(size={"height": image_size, "width": image_size})
    return EspMedSamProcessor(image_processor, modality_names=list(modality_names))


def save_with_processor(model: nn.Module, processor: EspMedSamProcessor, folder: Path) -> None:
    """``save_pretrained`` of the model and processor, plus preprocessor_config.json for the stock pipeline; a
    student folder also carries the "medical-image-segmentation" pipeline as remote code."""
    if isinstance(model, EspMedSamModel):
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


def dice_validation(model: nn.Module, processor: EspMedSamProcessor, data: dict, config: TrainingConfig) -> dict:
    """Mean validation Dice (%) over the domains, with ``data.evaluation.evaluate_model``."""
    from ..data.evaluation import evaluate_model

    usable = {name: dataset for name, dataset in data.items() if len(dataset["validation"])}
    if not usable:
        return {"dice": float("nan")}
    report = evaluate_model(
        model, processor, usable, split="validation",
        compute_hausdorff=False, max_images=config.validation_images, progress=False,
    )
    per_domain = {f"dice/{name}": row["dice"] for name, row in report["domains"].items()}
    return {"dice": float(np.mean(list(per_domain.values()))), **per_domain}


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: teacher
# ----------------------------------------------------------------------------------------------------------------


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


def segmentation_task(name: str, model: nn.Module, config: TrainingConfig, data: dict,
                      processor: EspMedSamProcessor | None = None):
    """(task, processor, data) of a stage trained with the segmentation loss and validated by Dice (1 and 3)."""
    processor = processor or make_processor(model.config.image_size, model.config.modality_names)
    task = StageTask(
        name=name,
        model=model,
        train_dataset=SegmentationDataset(data, "train", augment=config.augment, seed=config.seed,
                                          scale_augmentation=training_augmentation(config, processor.image_processor)),
        collate_fn=Collator(processor.image_processor),
        compute_loss=batch_loss,
        save=lambda m, folder: save_with_processor(m, processor, folder),
        validate=lambda m: dice_validation(m, processor, data, config),
    )
    return task, processor, data


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: multi-modal decoupled knowledge distillation
# ----------------------------------------------------------------------------------------------------------------


class UnpluggedBags:
    """A stand-in for the modality controller that plugs in no parameter bag: no tokens, a parallel MLP of zero.

    The modality-common phase trains the shared aggregator alone, so the bags must not take part.
    """

    def __init__(self, model: EspMedSamModel):
        self.controller = model.modality_controller

    def gather(self, block_index: int, modality: torch.LongTensor) -> GatheredBagBlock:
        block = self.controller.gather(block_index, modality)
        return dataclasses.replace(
            block, tokens=None, token_bias=None,
            fc2_weight=torch.zeros_like(block.fc2_weight), fc2_bias=torch.zeros_like(block.fc2_bias),
        )


class EncoderDistillation(nn.Module):
    """The student's image encoder as one module (so accelerate/DDP see its forward): embeddings of a batch.

    phase ``"common"``: aggregator without bags; ``"specific"``: aggregator with each image's bag, and the frozen
    aggregator kept in eval mode (its batch-norm statistics must not move either).
    """

    def __init__(self, student: EspMedSamModel, phase: str):
        super().__init__()
        if phase not in ("common", "specific"):
            raise ValueError(f"phase must be 'common' or 'specific', got {phase!r}")
        self.student, self.phase = student, phase

    def train(self, mode: bool = True) -> "EncoderDistillation":
        super().train(mode)
        if self.phase == "specific":
            self.student.aggregator.eval()
        return self

    def forward(self, pixel_values: torch.Tensor, modality: torch.LongTensor) -> torch.Tensor:
        aggregator = self.student.aggregator
        features = aggregator.stem(pixel_values)
        if self.phase == "common":
            modality = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
            return aggregator.forward_stages(features, modality, UnpluggedBags(self.student))
        return aggregator.forward_stages(features, modality, self.student.modality_controller)


def drop_absent_bag_gradients(wrapper: EncoderDistillation, modalities: set[int]) -> None:
    """Bags of modalities absent from this optimizer step get ``grad = None``: Adam then leaves them untouched
    (a zero gradient would still move them through Adam's running moments)."""
    for index, bag in enumerate(wrapper.student.modality_controller.bags):
        if index not in modalities:
            for parameter in bag.parameters():
                parameter.grad = None


def student_processor(model: EspMedSamModel, init_from: str | None) -> EspMedSamProcessor:
    """The preprocessing the student was trained with: its folder's processor, LiteMedSAM's for ``"litemedsam"``,
    else this package's default."""
    if init_from == "litemedsam":
        from ..conversion import litemedsam_image_processor

        return EspMedSamProcessor(litemedsam_image_processor(model.config.image_size),
                                  modality_names=list(model.config.modality_names))
    if init_from and (Path(init_from) / "preprocessor_config.json").is_file():
        return EspMedSamProcessor.from_pretrained(init_from)
    return make_processor(model.config.image_size, model.config.modality_names)


def apply_freeze(model: EspMedSamModel, names: list[str], frozen_encoder_stages: int = 0) -> None:
    """Everything trains except the parts ``names`` lists (see ``training.config.FREEZABLE``) and the encoder's
    first ``frozen_encoder_stages`` stages with their bags."""
    parts = {"aggregator": model.aggregator, "bags": model.modality_controller,
             "prompt_generator": model.prompt_generator, "mask_decoder": model.mask_decoder,
             "modality_classifier": model.modality_classifier}
    model.requires_grad_(True)
    for name in expand_freeze(names) - {"encoder"}:
        parts[name].requires_grad_(False)
    if frozen_encoder_stages:
        for module in frozen_prefix_modules(model, frozen_encoder_stages):
            module.requires_grad_(False)


def build_student(config: TrainingConfig, init_from: str | None) -> EspMedSamModel:
    """A student from a saved folder, from LiteMedSAM (``"litemedsam"``, 256 px), or freshly initialised."""
    if init_from == "litemedsam":
        from ..assets import LITEMEDSAM_WEIGHTS
        from ..conversion import convert_litemedsam

        model, report = convert_litemedsam(LITEMEDSAM_WEIGHTS.path())
        logger.info("student initialised from LiteMedSAM: %s", report.summary())
    elif init_from:
        if not Path(init_from).is_dir():
            raise FileNotFoundError(f"init_from {init_from} is not a saved model folder (or 'litemedsam')")
        model = EspMedSamModel.from_pretrained(init_from)
    elif config.model_size == "tiny":
        model = EspMedSamModel(EspMedSamConfig.tiny(image_size=config.image_size))
    else:
        model = EspMedSamModel(EspMedSamConfig(image_size=config.image_size))
    if model.config.image_size != config.image_size:
        raise ValueError(
            f"the student works at {model.config.image_size} px but image_size is {config.image_size}; set "
            f"image_size: {model.config.image_size} (LiteMedSAM's converted model works at 256 px)"
        )
    model.config.focal_loss_weight = config.focal_loss_weight
    return model


class EspMedSamEmbeddingTeacher(nn.Module):
    """An ESP-MedSAM teacher (stage 1 on LiteMedSAM's encoder) seen as distillation needs it: its image embeddings
    with its own parameter bags (``medical=True``) or with them unplugged (``medical=False``)."""

    def __init__(self, model: EspMedSamModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_embeddings(self, pixel_values: torch.Tensor, medical: bool = True,
                             modality: torch.LongTensor | None = None) -> torch.Tensor:
        aggregator = self.model.aggregator
        if modality is None:
            modality = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
        controller = self.model.modality_controller if medical else UnpluggedBags(self.model)
        return aggregator.forward_stages(aggregator.stem(pixel_values), modality, controller)


def load_teacher(path: str | Path) -> EspMedSamTeacherModel | EspMedSamEmbeddingTeacher:
    """The stage-1 teacher saved in ``path``: a SAM ViT teacher, or an ESP-MedSAM one (wrapped for distillation)."""
    import json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"teacher folder {path} holds no saved model; train stage 1 first (--stage teacher)")
    if json.loads((path / "config.json").read_text()).get("model_type") == EspMedSamConfig.model_type:
        model = EspMedSamModel.from_pretrained(path).eval().requires_grad_(False)
        return EspMedSamEmbeddingTeacher(model).eval()
    return EspMedSamTeacherModel.from_pretrained(path).eval().requires_grad_(False)


def intensity_augment(pixel_values: torch.Tensor, image_processor, generator: torch.Generator) -> torch.Tensor:
    """The batch under a random intensity shift per image (gamma 0.6-1.6, contrast 0.6-1.4, brightness +-0.15,
    per-channel gain 0.85-1.15, Gaussian noise sd <= 0.03), applied in [0, 1] intensities and normalised again."""
    mean = torch.tensor(image_processor.image_mean, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    # pixel = (value * rescale - mean) / std, value in 0..255 (rescale = 1 without do_rescale)
    rescale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
    intensities = ((pixel_values.cpu() * std + mean) / (rescale * 255)).clamp(0, 1)
    batch = pixel_values.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, *shape, 1, 1, generator=generator)

    shifted = intensities ** uniform(0.6, 1.6, 1)
    shifted = (shifted - 0.5) * uniform(0.6, 1.4, 1) + 0.5 + uniform(-0.15, 0.15, 1)
    shifted = shifted * uniform(0.85, 1.15, 3)
    shifted = shifted + uniform(0.0, 0.03, 1) * torch.randn(shifted.shape, generator=generator)
    shifted = shifted.clamp(0, 1)
    return ((shifted * 255 * rescale - mean) / std).to(pixel_values.device)


def check_embedding_shapes(teacher_config, student_config) -> None:
    """Teacher and student must give embeddings of one shape (channels, grid, input size)."""
    def shape(config) -> tuple[int, int, int]:
        channels = (config.aggregator_config.neck_dim if isinstance(config, EspMedSamConfig)
                    else config.vision_config.output_channels)
        return channels, config.embedding_grid_size, config.image_size

    if shape(teacher_config) != shape(student_config):
        (tc, tg, ts), (sc, sg, ss) = shape(teacher_config), shape(student_config)
        raise ValueError(f"teacher embeddings ({tc} x {tg}^2 at {ts} px) and student embeddings ({sc} x {sg}^2 at "
                         f"{ss} px) must have the same shape")


class EmbeddingDistillation:
    """The loss and validation of both distillation phases: the student's embedding against the teacher's, the
    student seeing an intensity-shifted copy of a medical image when ``intensity_augment`` is on."""

    def __init__(self, config: DistillConfig, teacher: EspMedSamTeacherModel | EspMedSamEmbeddingTeacher,
                 processor: EspMedSamProcessor):
        self.config, self.teacher, self.processor = config, teacher, processor
        self.generator = torch.Generator().manual_seed(config.seed)

    def targets(self, pixels: torch.Tensor, medical: bool, modality: torch.LongTensor) -> torch.Tensor:
        self.teacher.to(pixels.device)
        with torch.no_grad():
            if isinstance(self.teacher, EspMedSamEmbeddingTeacher):
                return self.teacher.get_image_embeddings(pixels, medical=medical, modality=modality)
            return self.teacher.get_image_embeddings(pixels, medical=medical)

    def student_view(self, pixels: torch.Tensor, medical: bool, generator: torch.Generator) -> torch.Tensor:
        if medical and self.config.intensity_augment:
            return intensity_augment(pixels, self.processor.image_processor, generator)
        return pixels

    def loss(self, medical: bool) -> Callable[[nn.Module, dict], torch.Tensor]:
        def compute(model: nn.Module, batch: dict) -> torch.Tensor:
            modality = batch["modality"].clamp(min=0)
            target = self.targets(batch["pixel_values"], medical, modality)
            predicted = model(self.student_view(batch["pixel_values"], medical, self.generator), modality)
            return F.mse_loss(predicted.float(), target.float())

        return compute

    def validation(self, dataset, medical: bool) -> Callable[[EncoderDistillation], dict]:
        collate = Collator(self.processor.image_processor)
        batch_size = max(8, self.config.batch_size)

        def validate(wrapper: EncoderDistillation) -> dict:
            was_training = wrapper.training
            wrapper.eval()
            device = next(wrapper.parameters()).device
            errors = []
            with torch.no_grad():
                for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
                    pixels, modality = batch["pixel_values"].to(device), batch["modality"].clamp(min=0).to(device)
                    target = self.targets(pixels, medical, modality)
                    pixels = self.student_view(pixels, medical, torch.Generator().manual_seed(self.config.seed + 1))
                    errors.append(F.mse_loss(wrapper(pixels, modality).float(), target.float()).item() * len(pixels))
            wrapper.train(was_training)
            return {"mse": sum(errors) / len(dataset)}

        return validate


def distill_tasks(config: DistillConfig, teacher: EspMedSamTeacherModel | EspMedSamEmbeddingTeacher,
                  student: EspMedSamModel, data: dict | None = None):
    """(common task, specific task, processor, data) of stage 2, sharing one student."""
    check_embedding_shapes(teacher.config, student.config)
    data = data or source_data(config)
    processor = student_processor(student, config.init_from)
    collate = Collator(processor.image_processor)
    photographs = load_natural_images(config.natural_images)
    distillation = EmbeddingDistillation(config, teacher, processor)
    common_model = EncoderDistillation(student, "common")
    freeze_all_but(student, [student.aggregator])
    common = StageTask(
        name="distill-common",
        model=common_model,
        train_dataset=NaturalImageDataset(photographs, repeats=config.natural_repeats, seed=config.seed),
        collate_fn=collate,
        compute_loss=distillation.loss(medical=False),
        save=lambda m, folder: save_with_processor(m.student, processor, folder),
        validate=distillation.validation(NaturalImageDataset(photographs, seed=config.seed + 1), medical=False),
        metric_name="mse",
        greater_is_better=False,
    )
    specific_validation = SegmentationDataset(
        {name: d for name, d in data.items() if len(d["validation"])}, "validation"
    ) if any(len(d["validation"]) for d in data.values()) else None
    specific = StageTask(
        name="distill-specific",
        model=EncoderDistillation(student, "specific"),
        train_dataset=SegmentationDataset(data, "train", augment=config.augment, seed=config.seed),
        collate_fn=collate,
        compute_loss=distillation.loss(medical=True),
        save=lambda m, folder: save_with_processor(m.student, processor, folder),
        validate=distillation.validation(specific_validation, medical=True) if specific_validation else None,
        metric_name="mse",
        greater_is_better=False,
        before_optimizer_step=drop_absent_bag_gradients,
    )
    return common, specific, processor, data


def run_distill(config: DistillConfig, teacher: EspMedSamTeacherModel | None = None, data: dict | None = None,
                student: EspMedSamModel | None = None) -> StageResult:
    """Both phases, in ``output_dir/common`` and ``output_dir/specific``; the release (``output_dir/release``) is the
    last modality-specific model. Seeded with ``config.seed`` before any model is built, as every stage."""
    set_seed(config.seed)
    teacher = teacher if teacher is not None else load_teacher(config.teacher)
    student = student if student is not None else build_student(config, config.init_from)
    common, specific, processor, data = distill_tasks(config, teacher, student, data)
    root = Path(config.output_dir)
    first = None
    if config.common_max_steps != 0:
        common_config = dataclasses.replace(
            config, epochs=config.common_epochs or config.epochs,
            max_steps=config.common_max_steps or config.max_steps,
        )
        first = train(common_config, common, root / "common")
    else:
        logger.info("distill: modality-common phase skipped (common_max_steps: 0)")
    # the specific phase starts from the last common weights; from here on only the bags train
    freeze_all_but(student, [student.modality_controller])
    specific_config = dataclasses.replace(
        config, epochs=config.specific_epochs or config.epochs,
        max_steps=config.specific_max_steps or config.max_steps,
    )
    second = train(specific_config, specific, root / "specific")
    release = write_release(second.final_dir, root)
    metrics = {"common_mse": first.best_metric if first else None, "specific_mse": second.best_metric}
    return StageResult("distill", release, [r for r in (first, second) if r], metrics)


# ----------------------------------------------------------------------------------------------------------------
# Stage 3: ESP-MedSAM
# ----------------------------------------------------------------------------------------------------------------


def espmedsam_task(config: EspMedSamStageConfig, model: EspMedSamModel | None = None, data: dict | None = None):
    """(task, processor, data) of stage 3: everything but the ``freeze`` parts trains (the modality classifier on
    detached features); with ``cache_features`` the frozen encoder's features are computed once."""
    data = data or source_data(config)
    processor = student_processor(model, None) if model is not None else None
    model = model if model is not None else build_student(config, config.init_from)
    processor = processor or student_processor(model, config.init_from)
    apply_freeze(model, config.freeze, config.frozen_encoder_stages)
    if config.cache_features:
        return cached_feature_task("espmedsam", model, config, data, processor)
    return segmentation_task("espmedsam", model, config, data, processor)


def cached_feature_task(name: str, model: EspMedSamModel, config: TrainingConfig, data: dict,
                        processor: EspMedSamProcessor):
    """(task, processor, data) of a segmentation stage on a frozen encoder prefix's cached features
    (:mod:`esp_medsam_hf.training.features`); validation Dice (%) on cached validation features at model size."""
    point = config.cache_point
    train_rows = SegmentationDataset(data, "train", augment=config.augment, seed=config.seed,
                                     scale_augmentation=training_augmentation(config, processor.image_processor))
    views = config.feature_views if config.augment else 1
    features = cache_features(model, processor.image_processor, train_rows, views=views, frozen_stages=point,
                              progress=config.progress, desc=f"{name}: encoding training images")
    usable = {n: d for n, d in data.items() if len(d["validation"])}
    validation = None
    if usable and config.validate:
        rows = SegmentationDataset(usable, "validation")
        validation = cache_features(model, processor.image_processor, rows, views=1, frozen_stages=point,
                                    progress=config.progress, desc=f"{name}: encoding validation images")
    trainable = EspMedSamAfterCache(model, point)

    def validate(module: EspMedSamAfterCache) -> dict:
        from ..metrics.functional import dice_score

        was_training = module.training
        module.eval()
        scores = []
        for start in range(0, validation.num_images, 16):
            logits = module.predict(validation.features[start : start + 16, 0],
                                    validation.modality[start : start + 16])
            labels = validation.labels[start : start + 16, 0]
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


def fit_modality_classifier(
    model: EspMedSamModel, processor: EspMedSamProcessor, data: dict, *, epochs: int, seed: int = 0,
    batch_size: int = 32, learning_rate: float = 3e-3, progress: bool = True,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Train the modality classifier alone on the ``train`` splits of ``data`` (the encoder stays frozen).

    The classifier reads detached stage-0 features, so the segmentation is unchanged. The pooled stage-0 features
    of every image (and of its mirror image) are computed once, by an inference-optimized copy of the model,
    ``backends.inference_batch_size`` images at a time; the head then trains on them for ``epochs`` epochs.
    ``known``: (pooled features, modalities) of more views already computed (a stage-3 feature cache's).
    Returns {"accuracy": training accuracy (%), "images": views seen / 2}.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    device = next(model.parameters()).device
    features, labels = [known[0]] if known else [], [known[1]] if known else []
    if data:
        encoder = copy.deepcopy(model).optimize_for_inference()
        loader = torch.utils.data.DataLoader(SegmentationDataset(data, "train"), batch_size=inference_batch_size(device),
                                             collate_fn=Collator(processor.image_processor))
        with torch.no_grad():
            for batch in loader:
                pixels = batch["pixel_values"].to(device)
                for view in (pixels, pixels.flip(-1)):
                    features.append(encoder.modality_classifier.pool(encoder.aggregator.stem(view)).cpu())
                    labels.append(batch["modality"])
        del encoder
    features, labels = torch.cat(features), torch.cat(labels)
    classifier = model.modality_classifier
    classifier.train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="modality classifier", unit="epoch", disable=not progress):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(classifier.head(features[index].to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = torch.cat([classifier.head(features[i : i + 256].to(device)).argmax(-1).cpu()
                               for i in range(0, len(labels), 256)])
    model.train(was_training)
    return {"accuracy": float((predicted == labels).float().mean() * 100), "images": len(labels) // 2}


def run_espmedsam(config: EspMedSamStageConfig, model: EspMedSamModel | None = None,
                  data: dict | None = None, classifier_data: dict | None = None) -> StageResult:
    """Stage 3; the release (``output_dir/release``) is the best validation model (the final one without
    validation), with the modality classifier fitted on ``classifier_domains`` (or ``classifier_data``, already
    loaded domains) when asked. Seeded with ``config.seed`` before any model is built."""
    set_seed(config.seed)
    task, processor, data = espmedsam_task(config, model, data)
    result = train(config, task)
    chosen = result.best_dir or result.final_dir
    metrics: dict = {"validation_dice": result.best_metric}
    fitted: dict = {}
    known = None
    if isinstance(task.train_dataset, FeatureDataset) and classifier_data is not None:
        # the stem is frozen below a feature cache: its pooled features of the training images are still right
        cache = task.train_dataset
        known = (cache.pooled.flatten(0, 1), cache.modality.repeat_interleave(cache.num_views))
        classifier_data = {name: domain for name, domain in classifier_data.items() if name not in data}

    def fit_classifier(staging: Path) -> None:
        fitted.update(_fit_classifier_into(config, chosen, staging, processor, classifier_data, known))

    release = write_release(chosen, Path(config.output_dir), fit_classifier)
    metrics.update(fitted)
    return StageResult("espmedsam", release, [result], metrics)



def write_release(chosen: Path, output_dir: Path, build=None) -> Path:
    """``output_dir/release``: a copy of ``chosen`` (or what ``build(staging)`` writes), replaced atomically, by the
    main process only under ``accelerate launch``."""
    from ..models.esp_medsam.fileio import staging_directory

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


def run_teacher(config: TeacherConfig, data: dict | None = None) -> StageResult:
    """Stage 1; the release (``output_dir/release``) is the best validation model (the final one without
    validation). Seeded with ``config.seed`` before any model is built: one seed, one result."""
    set_seed(config.seed)
    task, _, _ = teacher_task(config, data=data)
    result = train(config, task)
    release = write_release(result.best_dir or result.final_dir, Path(config.output_dir))
    return StageResult("teacher", release, [result], {"validation_dice": result.best_metric})


def run_stage(config: TrainingConfig) -> StageResult:
    """Run the stage that ``config`` describes (a TeacherConfig, DistillConfig or EspMedSamStageConfig)."""
    if isinstance(config, TeacherConfig):
        return run_teacher(config)
    if isinstance(config, DistillConfig):
        return run_distill(config)
    if isinstance(config, EspMedSamStageConfig):
        return run_espmedsam(config)
    raise TypeError(f"unknown stage configuration {type(config).__name__}")


__all__ = [
    "EncoderDistillation",
    "StageResult",
    "TrainingDataError",
    "UnpluggedBags",
    "build_student",
    "build_teacher",
    "distill_tasks",
    "drop_absent_bag_gradients",
    "espmedsam_task",
    "fit_modality_classifier",
    "run_distill",
    "run_espmedsam",
    "run_stage",
    "run_teacher",
    "teacher_task",
]
