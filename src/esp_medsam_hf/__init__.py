"""esp-medsam-hf: ESP-MedSAM (efficient self-prompting SAM for domain-generalised medical image segmentation) for
the Hugging Face ecosystem. Importing the package registers the model with transformers' Auto classes."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageSegmentation, AutoProcessor

from .configuration_esp_medsam import (
    MODALITY_NAMES,
    TARGET_NAMES,
    EspMedSamAggregatorConfig,
    EspMedSamConfig,
    EspMedSamDecoderConfig,
    EspMedSamParameterBagConfig,
    EspMedSamPromptGeneratorConfig,
)
from .image_processing_esp_medsam import EspMedSamImageProcessor
from .metrics import metric_path
from .modeling_esp_medsam import EspMedSamModel, EspMedSamOutput, EspMedSamPreTrainedModel
from .modeling_esp_medsam_teacher import EspMedSamTeacherModel  # registers the teacher's Auto classes
from .processing_esp_medsam import EspMedSamProcessor

AutoConfig.register(EspMedSamConfig.model_type, EspMedSamConfig, exist_ok=True)
AutoModel.register(EspMedSamConfig, EspMedSamModel, exist_ok=True)
AutoModelForImageSegmentation.register(EspMedSamConfig, EspMedSamModel, exist_ok=True)
AutoImageProcessor.register(
    EspMedSamConfig, image_processor_classes={"torchvision": EspMedSamImageProcessor}, exist_ok=True
)
AutoProcessor.register(EspMedSamConfig, EspMedSamProcessor, exist_ok=True)

# Saved folders carry the code and an `auto_map`, so they load with trust_remote_code=True without this package.
EspMedSamConfig.register_for_auto_class()
EspMedSamModel.register_for_auto_class("AutoModel")
EspMedSamImageProcessor.register_for_auto_class()
EspMedSamProcessor.register_for_auto_class()

from . import pipeline_esp_medsam  # noqa: E402  registers the "medical-image-segmentation" task

__all__ = [
    "MODALITY_NAMES",
    "TARGET_NAMES",
    "EspMedSamAggregatorConfig",
    "EspMedSamConfig",
    "EspMedSamDecoderConfig",
    "EspMedSamImageProcessor",
    "EspMedSamModel",
    "EspMedSamOutput",
    "EspMedSamParameterBagConfig",
    "EspMedSamPreTrainedModel",
    "EspMedSamProcessor",
    "EspMedSamPromptGeneratorConfig",
    "metric_path",
]
