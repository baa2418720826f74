"""esp-medsam-hf: ESP-MedSAM (efficient self-prompting SAM for domain-generalised medical image segmentation) for
the Hugging Face ecosystem. Importing the package adds its model types to transformers' Auto classes and changes
nothing else; ``register()`` (called by the entry points) adds remote code on save, the pipeline task and the DICOM
reader (see ``registration``)."""

from .models.esp_medsam.configuration_esp_medsam import (
    MODALITY_NAMES,
    TARGET_NAMES,
    EspMedSamAggregatorConfig,
    EspMedSamConfig,
    EspMedSamDecoderConfig,
    EspMedSamParameterBagConfig,
    EspMedSamPromptGeneratorConfig,
)
from .models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from .models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
from .metrics import metric_path
from .models.esp_medsam.modeling_esp_medsam import EspMedSamModel, EspMedSamOutput, EspMedSamPreTrainedModel
from .models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from .models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
from .registration import register, register_auto_classes

register_auto_classes()


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
    "EspMedSamTeacherConfig",
    "EspMedSamTeacherModel",
    "metric_path",
    "register",
]
