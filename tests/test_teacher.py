"""The medical teacher: SAM's vision encoder kept exact, medical tokens and MLPs, heads, saving and SAM loading."""

import json

import pytest
import torch
from transformers import AutoModel, SamConfig, SamModel, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam.configuration_esp_medsam_teacher import EspMedSamTeacherConfig
from esp_medsam_hf.models.esp_medsam.modeling_esp_medsam_teacher import EspMedSamTeacherModel

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


def tiny_teacher(**kwargs) -> EspMedSamTeacherModel:
    torch.manual_seed(0)
    return EspMedSamTeacherModel(EspMedSamTeacherConfig.tiny(image_size=SIZE, **kwargs))


def randomise_relative_positions(model: EspMedSamTeacherModel) -> None:
    """Non-zero positional terms (SAM initialises them at zero) so that the tests see them."""
    with torch.no_grad():
        for layer in model.vision_encoder.layers:
            layer.attn.rel_pos_h.normal_(std=0.5)
            layer.attn.rel_pos_w.normal_(std=0.5)
        model.vision_encoder.pos_embed.normal_(std=0.5)


def test_output_matches_student_shapes_and_loss():
    teacher = tiny_teacher()
    student = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))
    pixels = torch.randn(2, 3, SIZE, SIZE)
    modality = torch.tensor([0, 4])
    labels = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()
    out = teacher(pixels, modality=modality, labels=labels)
    reference = student(pixels, modality=modality, labels=labels)
    for name in ("pred_masks", "patch_logits", "image_embeddings"):
        assert getattr(out, name).shape == getattr(reference, name).shape
    assert out.loss is not None and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, out.mask_loss + teacher.config.patch_loss_weight * out.patch_loss)
    with pytest.raises(ValueError, match="needs the modality"):
        teacher(pixels)


def test_without_tokens_it_is_exactly_sams_encoder():
    """No tokens and the zero-initialised medical MLPs: the teacher's encoder computes SamVisionEncoder's output."""
    teacher = tiny_teacher(num_medical_tokens=0)
    randomise_relative_positions(teacher)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    sam = SamVisionEncoder(teacher.config.vision_config)
    sam.load_state_dict(teacher.vision_encoder.state_dict())
    expected = sam(pixels).last_hidden_state
    assert torch.allclose(teacher.get_image_embeddings(pixels), expected, atol=1e-5)
    assert torch.allclose(teacher.get_image_embeddings(pixels, medical=False), expected, atol=1e-5)


def test_tokens_change_attention_and_only_medical_parts_and_heads_learn():
    teacher = tiny_teacher()
    randomise_relative_positions(teacher)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    plain = teacher.get_image_embeddings(pixels, medical=False)
    medical = teacher.get_image_embeddings(pixels)
    assert (plain - medical).abs().max() > 1e-4  # the tokens take part in attention
    labels = (torch.rand(2, 1, SIZE, SIZE) > 0.5).float()
    teacher(pixels, modality=torch.tensor([1, 2]), labels=labels).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.vision_encoder.parameters())
    layer = teacher.medical_layers[0]
    for parameter in (layer.key_tokens, layer.value_tokens, layer.token_bias, layer.fc2.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert teacher.mask_decoder.mask_queries.weight.grad is not None


def test_token_bias_controls_token_attention():
    """A very negative token bias removes the tokens from the softmax: the output falls back to SAM's."""
    teacher = tiny_teacher()
    randomise_relative_positions(teacher)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        for layer in teacher.medical_layers:
            layer.token_bias.fill_(-1e4)
        assert torch.allclose(
            teacher.get_image_embeddings(pixels), teacher.get_image_embeddings(pixels, medical=False), atol=1e-5
        )


def test_save_and_reload_with_auto_classes(tmp_path):
    teacher = tiny_teacher().eval()
    teacher.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "esp_medsam_teacher"
    assert config["auto_map"]["AutoModel"] == "modeling_esp_medsam_teacher.EspMedSamTeacherModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_esp_medsam_teacher.EspMedSamTeacherConfig"
    for name in ("modeling_esp_medsam_teacher.py", "configuration_esp_medsam_teacher.py", "modeling_esp_medsam.py"):
        assert (tmp_path / name).is_file()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EspMedSamTeacherModel)
    assert all(not p.requires_grad for p in loaded.vision_encoder.parameters())
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a = teacher(pixels, modality=torch.tensor([3])).pred_masks
        b = loaded(pixels, modality=torch.tensor([3])).pred_masks
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


def test_from_sam_pretrained_loads_sam_vision_weights(tmp_path):
    """The path ``facebook/sam-vit-*`` takes, on a tiny SamModel saved locally (no Hub in tests)."""
    vision = EspMedSamTeacherConfig.tiny(image_size=SIZE).vision_config.to_dict()
    torch.manual_seed(1)
    sam = SamModel(SamConfig(vision_config=SamVisionConfig(**{k: vision[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_dim", "output_channels", "image_size",
        "patch_size", "window_size", "global_attn_indexes", "num_pos_feats")})))
    with torch.no_grad():
        for parameter in sam.vision_encoder.parameters():
            parameter.normal_(std=0.1)
    sam.save_pretrained(tmp_path)
    teacher = EspMedSamTeacherModel.from_sam_pretrained(str(tmp_path), EspMedSamTeacherConfig.tiny(image_size=SIZE))
    expected = sam.vision_encoder.state_dict()
    for name, value in teacher.vision_encoder.state_dict().items():
        assert torch.equal(value, expected[name]), name
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(teacher.get_image_embeddings(pixels, medical=False),
                              sam.vision_encoder(pixels).last_hidden_state, atol=1e-5)


def test_presets_give_the_students_embedding_grid():
    for preset in ("vit-b", "vit-l", "vit-h"):
        config = EspMedSamTeacherConfig.from_preset(preset)
        assert config.embedding_grid_size == EspMedSamConfig().embedding_grid_size == 64
        assert config.vision_config.output_channels == 256
    with pytest.raises(ValueError, match="unknown SAM preset"):
        EspMedSamTeacherConfig.from_preset("vit-x")


def test_forward_is_strict_and_honours_return_dict():
    teacher = tiny_teacher().eval()
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(TypeError, match="modalty"):
        teacher(pixels, modalty=torch.tensor([1]))
    with torch.no_grad():
        as_dict = teacher(pixels, torch.tensor([2]), original_sizes=torch.tensor([[30, 40]]))
        as_tuple = teacher(pixels, torch.tensor([2]), return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.pred_masks, rtol=0, atol=0)
