"""What esp_medsam_hf declares to transformers and Pillow.

- ``register_auto_classes()``, run when the package is imported: the Auto mappings of the package's model types.
  transformers 5 loads a processor's image processor only through ``AutoImageProcessor``, so
  ``EspMedSamProcessor.from_pretrained(folder)`` needs them; they add entries for ``esp_medsam`` and
  ``esp_medsam_teacher`` and change nothing else.
- ``register()``, called explicitly by the entry points (the ``esp-medsam`` command line and the scripts,
  ``inference.load_pipeline``, the Space, the test session): remote code for every ``save_pretrained``, the
  "medical-image-segmentation" task, the stock pipeline's list of models, and the Pillow DICOM plugin. Importing
  changes none of these. Saving a folder for the Hub (``save_pretrained_with_pipeline``) writes the remote code
  whether or not ``register()`` ran.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageSegmentation, AutoProcessor

from .models.esp_medsam import dicom_plugin, pipeline_esp_medsam
from .models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from .models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from .models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
from .models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from .models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel
from .models.esp_medsam.processing_esp_medsam import EspMedSamProcessor


def register_auto_classes() -> None:
    """The Auto classes (idempotent): the student's config, model (``AutoModel`` and
    ``AutoModelForImageSegmentation``, which the stock image-segmentation pipeline loads), image processor and
    processor; the teacher's config and model.

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


def register() -> None:
    """Everything, in one place (idempotent): the Auto classes; remote code (``register_for_auto_class``: every
    ``save_pretrained`` in this process then writes the code and an ``auto_map``, so saved folders load with
    ``trust_remote_code=True`` without this package); the "medical-image-segmentation" pipeline task and the stock
    pipeline's list of models; the Pillow plugin that reads DICOM files by content (``dicom_plugin``)."""
    register_auto_classes()
    EspMedSamConfig.register_for_auto_class()
    EspMedSamModel.register_for_auto_class("AutoModel")
    EspMedSamImageProcessor.register_for_auto_class()
    EspMedSamProcessor.register_for_auto_class()
    EspMedSamTeacherConfig.register_for_auto_class()
    EspMedSamTeacherModel.register_for_auto_class("AutoModel")

    pipeline_esp_medsam.register()
    dicom_plugin.register()


__all__ = ["register", "register_auto_classes"]
