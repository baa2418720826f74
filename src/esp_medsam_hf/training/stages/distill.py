"""Stage 2, multi-modal decoupled knowledge distillation (MMDKD): modality-common (the student's aggregator learns
the frozen SAM encoder's embeddings on natural photographs, parameter bags unplugged) then modality-specific (bag m
learns the medical teacher's embeddings on modality m, aggregator frozen; bags of modalities absent from a step get
no gradient at all, so Adam leaves them alone). MSE on the embeddings."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn

from ...models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel, GatheredBagBlock
from ...models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from ...models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from ..config import DistillConfig
from ..data import Collator, NaturalImageDataset, SegmentationDataset, load_natural_images
from ..loop import StageTask, train
from .shared import StageResult, freeze_all_but, save_with_processor, source_data, write_release
from .student import build_student, student_processor

logger = logging.getLogger(__name__)


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
        if self.phase == "common":
            modality = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
            return self.student.encode(pixel_values, modality, controller=UnpluggedBags(self.student))[0]
        return self.student.encode(pixel_values, modality)[0]


def drop_absent_bag_gradients(wrapper: EncoderDistillation, modalities: set[int]) -> None:
    """Bags of modalities absent from this optimizer step get ``grad = None``: Adam then leaves them untouched
    (a zero gradient would still move them through Adam's running moments)."""
    for index, bag in enumerate(wrapper.student.modality_controller.bags):
        if index not in modalities:
            for parameter in bag.parameters():
                parameter.grad = None


class EspMedSamEmbeddingTeacher(nn.Module):
    """An ESP-MedSAM teacher (stage 1 on LiteMedSAM's encoder) seen as distillation needs it: its image embeddings
    with its own parameter bags (``medical=True``) or with them unplugged (``medical=False``)."""

    def __init__(self, model: EspMedSamModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_embeddings(self, pixel_values: torch.Tensor, medical: bool = True,
                             modality: torch.LongTensor | None = None) -> torch.Tensor:
        if modality is None:
            modality = torch.zeros(pixel_values.shape[0], dtype=torch.long, device=pixel_values.device)
        controller = None if medical else UnpluggedBags(self.model)
        return self.model.encode(pixel_values, modality, controller=controller)[0]



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
    return StageResult("distill", release, [r for r in (first, second) if r], metrics, list(data))
