"""The student of stages 2 and 3 (and of an ESP-MedSAM teacher): built fresh, from a saved folder or from
LiteMedSAM, with the preprocessing it was trained with and the parts that stay frozen."""

from __future__ import annotations

import logging
from pathlib import Path

from ...models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ...models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ...models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from ..config import TrainingConfig, expand_freeze
from ..features import frozen_prefix_modules
from ..prompts import prompt_trainable
from .shared import make_processor

logger = logging.getLogger(__name__)


def build_student(config: TrainingConfig, init_from: str | None) -> EspMedSamModel:
    """A student from a saved folder, from LiteMedSAM (``"litemedsam"``, 256 px), or freshly initialised."""
    if init_from == "litemedsam":
        from ...assets import LITEMEDSAM_WEIGHTS
        from ...conversion import convert_litemedsam

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



def student_processor(model: EspMedSamModel, init_from: str | None) -> EspMedSamProcessor:
    """The preprocessing the student was trained with: its folder's processor, LiteMedSAM's for ``"litemedsam"``,
    else this package's default."""
    if init_from == "litemedsam":
        from ...conversion import litemedsam_image_processor

        return EspMedSamProcessor(litemedsam_image_processor(model.config.image_size),
                                  modality_names=list(model.config.modality_names))
    if init_from and (Path(init_from) / "preprocessor_config.json").is_file():
        return EspMedSamProcessor.from_pretrained(init_from)
    return make_processor(model.config.image_size, model.config.modality_names)


def apply_freeze(model: EspMedSamModel, names: list[str], frozen_encoder_stages: int = 0,
                 prompts: bool = False) -> None:
    """Everything trains except the parts ``names`` lists (see ``training.config.FREEZABLE``), the encoder's first
    ``frozen_encoder_stages`` stages with their bags, and the prompt encoder; with ``prompts`` (prompted training)
    its point embeddings train (``training.prompts.prompt_trainable``)."""
    parts = {"aggregator": model.aggregator, "bags": model.modality_controller,
             "prompt_generator": model.prompt_generator, "mask_decoder": model.mask_decoder,
             "modality_classifier": model.modality_classifier}
    model.requires_grad_(True)
    # Prompt-free training never runs SAM's prompt encoder, and clicks only its point embeddings: a parameter that
    # never gets a gradient would leave distributed data parallel's reduction waiting.
    model.prompt_encoder.requires_grad_(False)
    if prompts:
        for module in prompt_trainable(model):
            module.requires_grad_(True)
    for name in expand_freeze(names) - {"encoder"}:
        parts[name].requires_grad_(False)
    if frozen_encoder_stages:
        for module in frozen_prefix_modules(model, frozen_encoder_stages):
            module.requires_grad_(False)

