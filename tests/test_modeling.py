"""EspMedSamModel behaviour on small configurations: shapes, sizes, batching, loss, saving, remote code, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from esp_medsam_hf import (
    EspMedSamConfig,
    EspMedSamImageProcessor,
    EspMedSamModel,
    EspMedSamProcessor,
)


def randomise_bags(model: EspMedSamModel, seed: int = 0) -> None:
    """Give every parameter bag different, non-trivial values (freshly initialised bags are nearly alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bag in model.modality_controller.bags:
            for param in bag.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def tiny_model() -> EspMedSamModel:
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).eval()
    randomise_bags(model)
    return model


def test_output_shapes_follow_the_configured_size(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 64)
    out = tiny_model(pixel_values, modality=torch.tensor([0, 5]))
    assert out.pred_masks.shape == (2, 1, 16, 16)
    assert out.patch_logits.shape == (2, 1, 2, 2)
    assert out.image_embeddings.shape == (2, 32, 4, 4)
    assert out.modality_logits.shape == (2, 6)
    assert out.loss is None
    assert out.modality.tolist() == [0, 5]


@pytest.mark.parametrize("image_size", [256, 512])
def test_official_architecture_runs_at_other_sizes(image_size):
    config = EspMedSamConfig(image_size=image_size)
    assert config.embedding_grid_size == image_size // 16
    model = EspMedSamModel(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, image_size, image_size), modality=torch.tensor([2]))
    grid = image_size // 16
    assert out.image_embeddings.shape == (1, 256, grid, grid)
    assert out.patch_logits.shape == (1, 1, grid // 2, grid // 2)
    assert out.pred_masks.shape == (1, 1, 4 * grid, 4 * grid)


def test_default_config_has_the_papers_parameter_count():
    model = EspMedSamModel(EspMedSamConfig())
    total = sum(p.numel() for p in model.parameters())
    bag = sum(p.numel() for p in model.modality_controller.bags[0].parameters())
    classifier = sum(p.numel() for p in model.modality_classifier.parameters())
    prompts = sum(p.numel() for p in model.prompt_encoder.parameters())
    assert bag == 3_144_202  # the official modality-specific parameters of one bag
    assert prompts == 5 * 256  # SAM's point embeddings (negative, positive, two box corners) and not-a-point
    assert total - classifier - prompts == 28_182_737  # official used parameters with six bags (paper: 28.46 M)


def test_mixed_batch_equals_each_image_alone(tiny_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(4, 3, 64, 64)
    modality = torch.tensor([3, 0, 5, 3])
    with torch.no_grad():
        mixed = tiny_model(pixel_values, modality=modality)
        for i in range(4):
            alone = tiny_model(pixel_values[i : i + 1], modality=modality[i : i + 1])
            assert (mixed.pred_masks[i] - alone.pred_masks[0]).abs().max().item() <= 1e-5
            assert (mixed.image_embeddings[i] - alone.image_embeddings[0]).abs().max().item() <= 1e-5


def test_modality_changes_the_bag_and_the_query(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny_model(pixel_values, modality=torch.tensor([0]))
        b = tiny_model(pixel_values, modality=torch.tensor([1]))
    for x, y in ((a.image_embeddings, b.image_embeddings), (a.pred_masks, b.pred_masks)):
        assert (x - y).abs().max() > 0.05 * x.abs().max()


def test_without_modality_the_classifier_chooses(tiny_model):
    pixel_values = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = tiny_model(pixel_values)
        chosen = out.modality_logits.argmax(-1)
        given = tiny_model(pixel_values, modality=chosen)
    assert out.modality.tolist() == chosen.tolist()
    torch.testing.assert_close(out.pred_masks, given.pred_masks)


def test_loss_combines_mask_patch_and_modality_terms_and_trains():
    torch.manual_seed(0)
    config = EspMedSamConfig.tiny(image_size=64)
    model = EspMedSamModel(config).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 1, 64, 64)
    labels[:, :, 16:48, 16:48] = 1
    modality = torch.tensor([1, 4])
    out = model(pixel_values, modality=modality, labels=labels)
    expected = out.mask_loss + config.patch_loss_weight * out.patch_loss + config.modality_loss_weight * out.modality_loss
    torch.testing.assert_close(out.loss, expected)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = out.loss.item()
    for _ in range(25):
        optimizer.zero_grad()
        loss = model(pixel_values, modality=modality, labels=labels).loss
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    # The classifier reads detached features: its loss never reaches the aggregator.
    model.zero_grad()
    model(pixel_values, modality=modality, labels=labels).modality_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.aggregator.parameters())


def test_unused_bags_get_no_gradient_signal():
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).train()
    labels = (torch.rand(2, 1, 64, 64) > 0.5).float()
    model(torch.randn(2, 3, 64, 64), modality=torch.tensor([2, 2]), labels=labels).loss.backward()
    for index, bag in enumerate(model.modality_controller.bags):
        grads = [p.grad for p in bag.parameters() if p.grad is not None]
        total = sum(g.abs().sum().item() for g in grads)
        assert (total > 0) == (index == 2)


def test_eager_and_sdpa_attention_agree(tiny_model):
    config = EspMedSamConfig.tiny(image_size=64)
    config._attn_implementation = "eager"
    eager = EspMedSamModel(config).eval()
    eager.load_state_dict(tiny_model.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = eager(pixel_values, modality=torch.tensor([0, 1])).pred_masks
        b = tiny_model(pixel_values, modality=torch.tensor([0, 1])).pred_masks
    assert (a - b).abs().max().item() < 1e-5


def test_fused_batchnorm_computes_the_same(tiny_model):
    import copy

    fused = copy.deepcopy(tiny_model).fuse_batchnorm()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = fused(pixel_values, modality=torch.tensor([0, 1])).pred_masks
        b = tiny_model(pixel_values, modality=torch.tensor([0, 1])).pred_masks
    assert (a - b).abs().max().item() < 1e-4
    with pytest.raises(RuntimeError, match="eval mode"):
        copy.deepcopy(tiny_model).train().fuse_batchnorm()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = (torch.rand(2, 1, 64, 64) > 0.5).float()
    modality = torch.tensor([0, 3])

    def grads():
        model.zero_grad()
        model(pixel_values, modality=modality, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads()
    model.activation_checkpointing_enable()
    checkpointed = grads()
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("modality", "message"),
    [
        (torch.tensor([6]), "modality index 6 is out of range"),
        (torch.tensor([-1]), "modality index -1 is out of range"),
        (torch.tensor([0.0]), "integer tensor"),
        (torch.tensor([0, 1]), r"shape \(1,\)"),
    ],
)
def test_bad_modality_gives_a_clear_error(tiny_model, modality, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(torch.randn(1, 3, 64, 64), modality=modality)


@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (1, 3, 32, 32), (3, 64, 64)])
def test_bad_pixel_values_give_a_clear_error(tiny_model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 64, 64\)"):
        tiny_model(torch.randn(*shape), modality=torch.tensor([0]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of 32"):
        EspMedSamConfig(image_size=1000)
    with pytest.raises(ValueError, match="same length"):
        EspMedSamConfig(modality_names=["a", "b"], target_names=["x"])
    with pytest.raises(ValueError, match="unknown modality 'mri'"):
        EspMedSamConfig().modality_index("mri")


def test_save_and_load_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    reloaded = EspMedSamModel.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = tiny_model(pixel_values, modality=torch.tensor([2, 4]))
        b = reloaded(pixel_values, modality=torch.tensor([2, 4]))
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.modality_logits, b.modality_logits)
    assert (tmp_path / "model.safetensors").is_file()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageSegmentation"] == "modeling_esp_medsam.EspMedSamModel"


HIDE_PACKAGE = """
import sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
try:
    import esp_medsam_hf
    raise SystemExit("esp_medsam_hf is importable: the test would not show remote code")
except ImportError:
    pass
"""


def test_trust_remote_code_loads_in_a_fresh_process(tiny_model, tmp_path):
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 64, "width": 64}))
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    image = (np.random.default_rng(0).random((80, 50, 3)) * 255).astype(np.uint8)
    inputs = processor(images=image, modality="fundus")
    with torch.no_grad():
        expected = tiny_model(**inputs).pred_masks
    torch.save({"image": image, "expected": expected}, tmp_path / "io.pt")
    code = HIDE_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageSegmentation, AutoProcessor
        folder = {str(tmp_path)!r}
        io = torch.load(folder + "/io.pt", weights_only=False)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(images=io["image"], modality="fundus")
        with torch.no_grad():
            got = model(**inputs).pred_masks
        assert (got - io["expected"]).abs().max().item() < 1e-5
        assert type(AutoModelForImageSegmentation.from_pretrained(folder, trust_remote_code=True)).__name__ == "EspMedSamModel"
        print("remote code OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout


def test_processor_round_trip_and_modality_names(tmp_path):
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 64, "width": 64}))
    processor.save_pretrained(tmp_path)
    EspMedSamConfig.tiny(image_size=64).save_pretrained(tmp_path)
    reloaded = EspMedSamProcessor.from_pretrained(tmp_path)
    assert reloaded.modality_names == processor.modality_names
    assert reloaded.image_processor.size.height == 64
    images = [np.zeros((30, 40, 3), np.uint8), np.full((64, 64), 200, np.uint8)]
    inputs = reloaded(images=images, modality=["x-ray", 5], segmentation_maps=[np.ones((30, 40)), np.zeros((64, 64))])
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    assert inputs["original_sizes"].tolist() == [[30, 40], [64, 64]]
    assert inputs["modality"].tolist() == [1, 5]
    assert inputs["labels"].shape == (2, 1, 64, 64) and inputs["labels"][0].min() == 1 and inputs["labels"][1].max() == 0
    with pytest.raises(ValueError, match="unknown modality 'mri'"):
        reloaded(images=images, modality="mri")
    with pytest.raises(ValueError, match="out of range"):
        reloaded(images=images, modality=6)
    with pytest.raises(ValueError, match="2 modalities for 1 images"):
        reloaded(images=images[:1], modality=[0, 1])
    with pytest.raises(ValueError, match="segmentation map 0 has size"):
        reloaded(images=images, segmentation_maps=[np.ones((10, 10)), np.ones((64, 64))])


def test_labels_follow_the_resized_image_and_commute_with_flips():
    processor = EspMedSamImageProcessor(size={"height": 64, "width": 64})
    rows, cols = np.mgrid[:256, :256]
    disk = ((rows - 90.3) ** 2 + (cols - 151.7) ** 2 < 40.5**2).astype(np.uint8)
    line = np.zeros((256, 256), np.uint8)
    line[1:4] = 1  # three rows inside the first 4x4 footprints: nearest sampling (rows 0, 4, ...) dropped them
    image = np.zeros((256, 256), np.uint8)

    def labels(mask: np.ndarray) -> np.ndarray:
        return processor([image], segmentation_maps=[mask], return_tensors="pt")["labels"][0, 0].numpy()

    assert labels(line)[0].all() and labels(line)[1:].sum() == 0
    for flip in (np.fliplr, np.flipud):
        np.testing.assert_array_equal(labels(np.ascontiguousarray(flip(disk))), flip(labels(disk)))
    # the label's area is the disk's area at the new scale (within one ring of border pixels)
    assert abs(labels(disk).sum() - disk.sum() / 16) < 2 * np.pi * 40.5 / 4


def test_post_process_masks_returns_original_sizes():
    processor = EspMedSamImageProcessor(size={"height": 64, "width": 64})
    logits = torch.full((2, 1, 16, 16), -5.0)
    logits[0, 0, :8] = 5.0  # top half foreground
    masks = processor.post_process_masks(logits, [[100, 60], [64, 64]])
    assert masks[0].shape == (100, 60) and masks[1].shape == (64, 64)
    assert masks[0][:45].all() and not masks[0][55:].any()
    assert not masks[1].any()
    probabilities = processor.post_process_masks(logits, [[64, 64], [64, 64]], binarize=False,
                                                 return_probabilities=True)
    assert 0 < probabilities[0].min() < 0.01 and probabilities[0].max() > 0.99


def test_post_process_masks_follows_sams_conventions():
    """SamImageProcessor's arguments: mask_threshold on logits, binarize=False gives logits, reshaped sizes crop."""
    from transformers import SamImageProcessor

    processor = EspMedSamImageProcessor(size={"height": 64, "width": 64})
    logits = torch.linspace(-4.0, 4.0, 16).repeat(16, 1).reshape(1, 1, 16, 16)  # rising from left to right
    upscaled = processor.post_process_masks(logits, [[64, 64]], binarize=False)[0]
    assert upscaled.shape == (64, 64) and float(upscaled.min()) < -3.5 and float(upscaled.max()) > 3.5
    default = processor.post_process_masks(logits, [[64, 64]])[0]
    torch.testing.assert_close(default, upscaled > 0.0)
    strict = processor.post_process_masks(logits, [[64, 64]], mask_threshold=2.0)[0]
    torch.testing.assert_close(strict, upscaled > 2.0)
    assert 0 < strict.sum() < default.sum()
    probabilities = processor.post_process_masks(logits, [[64, 64]], binarize=False, return_probabilities=True)[0]
    torch.testing.assert_close(probabilities, torch.sigmoid(upscaled))
    # SAM's processor gives the same masks when the whole input is the resized image (no padding)
    sam = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    for threshold in (0.0, 2.0):
        expected = sam.post_process_masks([logits], [[40, 30]], [[64, 64]], mask_threshold=threshold)[0][0, 0]
        got = processor.post_process_masks(logits, [[40, 30]], [[64, 64]], mask_threshold=threshold)[0]
        torch.testing.assert_close(got, expected)
    # the resized image in the top-left 32x64 of the input: the crop keeps the left half, then upsamples it
    cropped = processor.post_process_masks(logits, [[40, 30]], reshaped_input_sizes=[[64, 32]], binarize=False)[0]
    expected = torch.nn.functional.interpolate(upscaled[None, None, :, :32], size=(40, 30), mode="bilinear",
                                               align_corners=False)[0, 0]
    torch.testing.assert_close(cropped, expected)
    with pytest.raises(ValueError, match="reshaped_input_sizes"):
        processor.post_process_masks(logits, [[40, 30]], reshaped_input_sizes=[[80, 32]])


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_weights_run_and_agree_with_float32(tiny_model, tmp_path, dtype, tolerance):
    """from_pretrained(dtype=...) keeps _keep_in_fp32_modules in float32; .to(dtype) casts all; both run."""
    tiny_model.save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny_model(pixel_values)
    loaded = EspMedSamModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert loaded.aggregator.neck[0].weight.dtype == dtype
    assert loaded.mask_decoder.transformer.layers[0].mlp.lin1.weight.dtype == dtype
    assert loaded.modality_classifier.fc1.weight.dtype == torch.float32
    assert loaded.mask_decoder.positional_encoding.gaussian_matrix.dtype == torch.float32
    for model in (loaded, EspMedSamModel.from_pretrained(tmp_path).eval().to(dtype)):
        with torch.no_grad():
            out = model(pixel_values)  # float32 pixels, as the image processor returns them
        assert out.pred_masks.dtype == dtype
        assert out.modality.tolist() == reference.modality.tolist()
        for name in ("pred_masks", "image_embeddings", "patch_logits", "modality_logits"):
            expected, got = getattr(reference, name), getattr(out, name).float()
            assert (got - expected).abs().max() <= tolerance * expected.abs().max(), name


def test_forward_refuses_unknown_arguments(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with pytest.raises(TypeError, match="modalty"):
        tiny_model(pixel_values, modalty=torch.tensor([1]))
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 64, "width": 64}))
    inputs = processor(images=np.zeros((30, 40, 3), np.uint8), modality="fundus")
    with torch.no_grad():
        assert tiny_model(**inputs).modality.tolist() == [3]  # the processor's whole output is accepted


def test_return_dict_false_gives_the_output_tuple(tiny_model):
    pixel_values = torch.randn(2, 3, 64, 64)
    modality = torch.tensor([1, 2])
    with torch.no_grad():
        as_dict = tiny_model(pixel_values, modality)
        as_tuple = tiny_model(pixel_values, modality, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple()) == 5
    for got, expected in zip(as_tuple, as_dict.to_tuple()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[0], as_dict.pred_masks, rtol=0, atol=0)


def test_output_hidden_states_are_the_encoder_stage_outputs(tiny_model):
    config = tiny_model.config.aggregator_config
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = tiny_model(pixel_values, torch.tensor([0, 4]))
        out = tiny_model(pixel_values, torch.tensor([0, 4]), output_hidden_states=True)
    assert plain.hidden_states is None
    states = out.hidden_states
    assert len(states) == len(config.embed_dims) + 1
    assert [s.shape[1] for s in states] == [*config.embed_dims, config.neck_dim]
    assert states[0].shape[-1] == 64 // 4 and states[-1].shape[-1] == tiny_model.config.embedding_grid_size
    torch.testing.assert_close(states[-1], out.image_embeddings, rtol=0, atol=0)
    torch.testing.assert_close(out.pred_masks, plain.pred_masks, rtol=0, atol=0)
    with torch.no_grad():
        neck = tiny_model.aggregator.neck(states[-2])
    torch.testing.assert_close(neck, out.image_embeddings)


def test_get_image_embeddings_is_the_forwards_encoder():
    """The public encoder (SamModel's name) gives the embeddings the forward decodes, per image modality."""
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    modality = torch.tensor([0, 3])
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels, modality)
        outputs = model(pixels, modality=modality)
        automatic = model.get_image_embeddings(pixels)
        chosen = model(pixels).modality
    torch.testing.assert_close(embeddings, outputs.image_embeddings, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(automatic, model.get_image_embeddings(pixels, chosen), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="modality index 6 is out of range"):
        model.get_image_embeddings(pixels, torch.tensor([0, 6]))
