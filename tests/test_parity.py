"""Numerical parity with the official ESP-MedSAM release (fixtures in ../shared/parity, random official weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esp_medsam_hf import EspMedSamImageProcessor
from esp_medsam_hf.conversion import convert_original_checkpoints

PARITY = Path(__file__).resolve().parents[2] / "shared" / "parity"
WEIGHTS = PARITY / "esp_medsam_original_random.safetensors"
IO = PARITY / "esp_medsam_original_io.safetensors"

if not (WEIGHTS.is_file() and IO.is_file()):
    pytest.skip(f"parity fixtures not found in {PARITY}: the parity tests need ../shared/parity", allow_module_level=True)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(IO))


@pytest.fixture(scope="module")
def converted():
    model, report = convert_original_checkpoints({None: WEIGHTS})
    return model.eval(), report


@pytest.fixture(scope="module")
def outputs(converted, reference):
    """One forward of the two fixture images with different modalities (1 and 4) in the same batch."""
    model, _ = converted
    with torch.no_grad():
        return model(reference["pixel_values"], modality=torch.tensor([1, 4]))


@pytest.fixture(scope="module")
def decoded(converted, outputs) -> dict[int, torch.Tensor]:
    """Low-res masks of both images for every modality, from the (modality-independent) embedding."""
    model, _ = converted
    with torch.no_grad():
        _, dense_prompt = model.prompt_generator(outputs.image_embeddings)
        return {
            d: model.mask_decoder(outputs.image_embeddings, dense_prompt, torch.full((2,), d)) for d in range(6)
        }


def test_conversion_report_lists_dropped_tensors(converted):
    _, report = converted
    assert "SemiTViT.head.weight" in report.dropped
    assert "prompt_encoder.no_mask_embed.weight" in report.dropped
    # norm_head, head, and SAM's mask input and no-mask embedding (11 prompt-encoder tensors); the point and box
    # embeddings are kept for optional prompts
    assert len(report.dropped) == 15
    assert "prompt_encoder.point_embeddings.0.weight" not in report.dropped
    assert all(key.startswith("modality_classifier.") for key in report.not_in_checkpoint)


def test_image_embeddings_and_patch_map_match(outputs, reference):
    torch.testing.assert_close(outputs.image_embeddings, reference["image_embeddings"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs.patch_logits, reference["patch_map"], atol=1e-4, rtol=1e-4)


def test_mixed_batch_decodes_each_image_with_its_own_modality(outputs, reference):
    assert (outputs.pred_masks[0] - reference["low_res_masks.domain1"][0]).abs().max().item() <= 2e-5
    assert (outputs.pred_masks[1] - reference["low_res_masks.domain4"][1]).abs().max().item() <= 2e-5


@pytest.mark.parametrize("domain", range(6))
def test_low_res_masks_match_every_domain(decoded, reference, domain):
    assert (decoded[domain] - reference[f"low_res_masks.domain{domain}"]).abs().max().item() <= 2e-5


def test_final_masks_match(converted, decoded, reference):
    model, _ = converted
    final = model.upscale_masks(decoded[0])
    assert (final - reference["masks.domain0"]).abs().max().item() <= 2e-5


def test_official_image_processor_reproduces_pixel_values(reference):
    processor = EspMedSamImageProcessor.official()
    images = list(reference["images_uint8"].numpy())
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    assert (pixel_values - reference["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("index, domain", [(0, 1), (1, 4)])
def test_single_modality_batch_uses_the_bag_directly_and_matches(converted, reference, index, domain):
    """A batch of one modality takes the bag's weights directly (no gathered copies, one joint MLP per block):
    the same official outputs as the gathered path of the mixed batch."""
    model, _ = converted
    with torch.no_grad():
        single = model(reference["pixel_values"][index : index + 1], modality=torch.tensor([domain]))
    torch.testing.assert_close(
        single.image_embeddings[0], reference["image_embeddings"][index], atol=1e-4, rtol=1e-4
    )
    assert (single.pred_masks[0] - reference[f"low_res_masks.domain{domain}"][index]).abs().max().item() <= 1e-4
