"""transformers' own ``ImageProcessingTestMixin`` (with the semantic-segmentation post-processing mixin) and
``ProcessorTesterMixin`` on ``EspMedSamImageProcessor`` and ``EspMedSamProcessor``.

The mixins come unmodified from the installed transformers' sdist (tests/_transformers_common.py). Each skip names
why the test does not apply.
"""

from __future__ import annotations

import unittest

import torch

from _transformers_common import common_module
from esp_medsam_hf.models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam import EspMedSamOutput
from esp_medsam_hf.models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

image_common = common_module("test_image_processing_common")
ProcessorTesterMixin = common_module("test_processing_common").ProcessorTesterMixin

SIZE = 32
NUM_MODALITIES = 6


class EspMedSamImageProcessingTester(image_common.ImageProcessingTester):
    """Random images between 30 and 80 px, resized to 32 px; post-processing inputs are model outputs."""

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": SIZE, "width": SIZE})
        kwargs.setdefault("max_resolution", 80)
        kwargs.setdefault("batch_size", 3)
        super().__init__(parent, **kwargs)
        self.num_labels = NUM_MODALITIES + 1  # background + one target per modality

    def _get_image_processing_classes(self) -> dict[str, type]:
        # The mixin looks the classes up in transformers' own mapping; ours is remote code with one backend.
        return {"torchvision": EspMedSamImageProcessor}

    def prepare_post_process_semantic_segmentation_inputs(self) -> tuple[dict, dict]:
        generator = torch.Generator().manual_seed(0)
        outputs = EspMedSamOutput(
            pred_masks=torch.randn(self.batch_size, 1, SIZE // 4, SIZE // 4, generator=generator),
            modality_logits=torch.randn(self.batch_size, NUM_MODALITIES, generator=generator),
            modality=torch.arange(self.batch_size) % NUM_MODALITIES,
        )
        expected = {"num_labels": self.num_labels, "height": SIZE // 4, "width": SIZE // 4}
        return {"outputs": outputs}, expected


class EspMedSamImageProcessingTest(
    image_common.ImageProcessingTestMixin, image_common.PostProcessSemanticSegmentationTestMixin, unittest.TestCase
):
    image_processor_tester_class = EspMedSamImageProcessingTester


class EspMedSamProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = EspMedSamProcessor

    @classmethod
    def _setup_image_processor(cls) -> EspMedSamImageProcessor:
        return EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE})
