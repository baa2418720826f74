"""transformers' own ``ModelTesterMixin`` and ``ConfigTester`` on the student and the teacher (tiny configs).

The mixins come unmodified from the installed transformers' sdist (tests/_transformers_common.py). Each skip names
why the test does not apply to this architecture.
"""

from __future__ import annotations

import copy
import unittest

import torch
from parameterized import parameterized

from _transformers_common import common_module
from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel

modeling_common = common_module("test_modeling_common")
ModelTesterMixin = modeling_common.ModelTesterMixin
ConfigTester = common_module("test_configuration_common").ConfigTester

SIZE = 64


class EspMedSamModelTester:
    """Tiny student configs and inputs for the common tests: 64 px images of two modalities.

    Attention layout of ``EspMedSamConfig.tiny`` at 64 px: four TinyViT blocks (stages 1-3: 1 + 2 + 1); the first
    attends over 7x7 windows (49 queries) to 49 keys plus one parameter-bag token, with one head.
    """

    batch_size = 2
    num_hidden_layers = 4
    # The common training tests build labels only for the model types of transformers' own task mappings, so they
    # would call ours without labels (no loss); training with labels is tested in tests/test_training.py,
    # tests/test_modeling.py and tests/test_feature_cache.py.
    is_training = False
    num_attention_heads = 1
    seq_length = 49
    key_length = 50
    hidden_shapes = ((16, 16, 16), (32, 8, 8), (32, 4, 4), (64, 4, 4), (32, 4, 4))  # stem, stages 1-3, neck: (C, H, W)

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
    """Tiny teacher configs (a two-layer SAM ViT: a windowed layer, then a global one, on a 4x4 patch grid) with the
    student's inputs: 16 queries attend to 16 keys plus two medical tokens, with two heads."""

    num_hidden_layers = 2
    num_attention_heads = 2
    seq_length = 16
    key_length = 18
    hidden_shapes = ((4, 4, 48),) * 3  # embedded patches, then each layer: (H, W, C) as SAM's vision encoder

    def get_config(self) -> EspMedSamTeacherConfig:
        return EspMedSamTeacherConfig.tiny(image_size=SIZE)


class ImageShapedHiddenStatesMixin:
    """``test_hidden_states_output`` for image-shaped hidden states.

    The common test reads every hidden state as (batch, sequence, hidden_size); the student's are feature maps
    (B, C, H, W) of stages with different widths and the teacher's SAM's (B, H, W, C), so, as transformers' own
    tests of convolutional and SAM models do, this override checks their number and shapes, asked for by argument
    and by ``config.output_hidden_states``.
    """

    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        expected = [(self.model_tester.batch_size, *shape) for shape in self.model_tester.hidden_shapes]
        for model_class in self.all_model_classes:
            for by_config in (False, True):
                config.output_hidden_states = by_config
                model = model_class(copy.deepcopy(config)).eval()
                with torch.no_grad():
                    outputs = model(**inputs, **({} if by_config else {"output_hidden_states": True}))
                self.assertEqual([tuple(h.shape) for h in outputs.hidden_states], expected)
            config.output_hidden_states = False
            with torch.no_grad():
                self.assertIsNone(model_class(copy.deepcopy(config)).eval()(**inputs).hidden_states)


class EspMedSamModelTest(ImageShapedHiddenStatesMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EspMedSamModel,)
    additional_model_inputs = ["modality"]  # each image's modality, beside pixel_values
    test_resize_embeddings = False  # no token embeddings
    test_torch_exportable = False  # exported to ONNX instead (tests/test_export.py)

    def setUp(self):
        self.model_tester = EspMedSamModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EspMedSamConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip("images only: no token input embeddings to get or set")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip("TinyViT's tiny configuration is already its minimum: four attention blocks over three stages")
    def test_num_layers_is_small(self):
        pass

    @parameterized.expand(modeling_common.TEST_EAGER_MATCHES_SDPA_INFERENCE_PARAMETERIZATION)
    def test_eager_matches_sdpa_inference(
        self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels
    ):
        """The common test with a float16 tolerance of 2e-2 on the CPU (5e-3 in the mixin), as transformers' own
        tests of some vision models set theirs: the eager attention multiplies queries and keys in float16 where
        SDPA does not, and the neck's LayerNorms scale the difference up (measured: 1.4e-2 to 1.7e-2 on outputs of
        magnitude about 3, over four seeds; every sample within 2e-2); float32 keeps the mixin's 1e-6."""
        atols, rtols = {}, {}
        for device in ("cpu", "cuda"):
            for kernels in (False, True):
                atols.update({(device, kernels, torch.float32): 1e-6, (device, kernels, torch.bfloat16): 1e-2,
                              (device, kernels, torch.float16): 2e-2 if device == "cpu" else 5e-3})
                rtols.update({(device, kernels, torch.float32): 1e-4, (device, kernels, torch.float16): 2e-2 if
                              device == "cpu" else 5e-3, (device, kernels, torch.bfloat16): 3e-2 if
                              device == "cuda" and kernels else 1e-2})
        modeling_common._test_eager_matches_sdpa_inference(
            self, name, dtype, padding_side, use_attention_mask, output_attentions, enable_kernels, atols, rtols
        )


class EspMedSamTeacherModelTest(ImageShapedHiddenStatesMixin, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (EspMedSamTeacherModel,)
    additional_model_inputs = ["modality"]  # the teacher needs each image's modality
    test_resize_embeddings = False
    test_torch_exportable = False

    def setUp(self):
        self.model_tester = EspMedSamTeacherModelTester(self)
        self.config_tester = ConfigTester(self, config_class=EspMedSamTeacherConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip("images only: no token input embeddings to get or set")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip("the teacher's SAM image encoder is frozen by design (no gradients), so its hidden states hold none")
    def test_retain_grad_hidden_states_attentions(self):
        pass
