"""esp-medsam-hf: ESP-MedSAM (efficient self-prompting SAM for domain-generalised medical image segmentation) for
the Hugging Face ecosystem. Importing the package registers the models with transformers (``register``)."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageSegmentation, AutoProcessor

from .models.esp_medsam import pipeline_esp_medsam
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


def register() -> None:
    """Register everything with transformers, in one place (idempotent; run on import).

    - the Auto classes: the student's config, model (``AutoModel`` and ``AutoModelForImageSegmentation``, which the
      stock image-segmentation pipeline loads), image processor and processor; the teacher's config and model;
    - remote code: saved folders carry the code and an ``auto_map``, so they load with ``trust_remote_code=True``
      without this package;
    - the "medical-image-segmentation" pipeline task.

    Only the package registers: a copy of the modules loaded as remote code (``transformers_modules.*``) must not
    replace the package's classes in the Auto mappings of a process that has both.
    """
    AutoConfig.register(EspMedSamConfig.model_type, EspMedSamConfig, exist_ok=True)
    AutoModel.register(EspMedSamConfig, EspMedSamModel, exist_ok=True)
    AutoModelForImageSegmentation.register(EspMedSamConfig, EspMedSamModel, exist_ok=True)
    AutoImageProcessor.register(
        EspMedSamConfig, image_processor_classes={"torchvision": EspMedSamImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(EspMedSamConfig, EspMedSamProcessor, exist_ok=True)
    AutoConfig.register(EspMedSamTeacherConfig.model_type, EspMedSamTeacherConfig, exist_ok=True)
    AutoModel.register(EspMedSamTeacherConfig, EspMedSamTeacherModel, exist_ok=True)

    EspMedSamConfig.register_for_auto_class()
    EspMedSamModel.register_for_auto_class("AutoModel")
    EspMedSamImageProcessor.register_for_auto_class()
    EspMedSamProcessor.register_for_auto_class()
    EspMedSamTeacherConfig.register_for_auto_class()
    EspMedSamTeacherModel.register_for_auto_class("AutoModel")

    pipeline_esp_medsam.register()


register()

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
