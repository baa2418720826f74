"""transformers' own ``ModelTesterMixin`` and ``ConfigTester`` on the student and the teacher (tiny configs).

The mixins come unmodified from the installed transformers' sdist (tests/_transformers_common.py). Each skip names
why the test does not apply to this architecture.
"""

from __future__ import annotations

import unittest

import torch

from _transformers_common import common_module
from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel

ModelTesterMixin = common_module("test_modeling_common").ModelTesterMixin
ConfigTester = common_module("test_configuration_common").ConfigTester

SIZE = 64


class EspMedSamModelTester:
    """Tiny student configs and inputs for the common tests: 64 px images of two modalities."""

    batch_size = 2

    def __init__(self, parent: unittest.TestCase):
        self.parent = parent

    def get_config(self) -> EspMedSamConfig:
        return EspMedSamConfig.tiny(image_size=SIZE)

    def prepare_config_and_inputs_for_common(self) -> tuple[EspMedSamConfig, dict[str, torch.Tensor]]:
        config = self.get_config()
        generator = torch.Generator().manual_seed(0)
        inputs = {
            "pixel_values": torch.randn(self.batch_size, 3, SIZE, SIZE, generator=generator),
            "modality": torch.tensor([0, 3]),
        }
        return config, inputs


class EspMedSamTeacherModelTester(EspMedSamModelTester):
    """Tiny teacher configs (a two-layer SAM ViT) with the student's inputs."""

    def get_config(self) -> EspMedSamTeacherConfig:
        return EspMedSamTeacherConfig.tiny(image_size=SIZE)


class EspMedSamModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EspMedSamModel,)
    test_resize_embeddings = False  # no token embeddings
    test_torch_exportable = False  # exported to ONNX instead (tests/test_export.py)

    def setUp(self):
        self.model_tester = EspMedSamModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EspMedSamConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()


class EspMedSamTeacherModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EspMedSamTeacherModel,)
    test_resize_embeddings = False
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = EspMedSamTeacherModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EspMedSamTeacherConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()
