"""ONNX export of the inference graph and onnxruntime parity (tiny configuration, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from esp_medsam_hf.models.esp_medsam.export import OUTPUT_NAMES, export_onnx, onnxruntime_session  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE, initializer_range=0.2)).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_within_1e4(exported, batch):
    model, path = exported
    session = onnxruntime_session(path, num_threads=1)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    generator = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    modality = torch.tensor([4, 0, 5][:batch])
    with torch.no_grad():
        reference = model(pixels, modality=modality)
    outputs = dict(zip(OUTPUT_NAMES, session.run(None, {"pixel_values": pixels.numpy(), "modality": modality.numpy()})))
    assert reference.pred_masks.abs().max() > 0.1  # logits of order one, so the tolerance means something
    for name in OUTPUT_NAMES[:3]:
        np.testing.assert_allclose(outputs[name], getattr(reference, name).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(outputs["decoded_modality"], modality.numpy())


def test_modality_minus_one_is_chosen_by_the_classifier(exported):
    model, path = exported
    session = onnxruntime_session(path, num_threads=1)
    pixels = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    given = torch.tensor([1, -1, 3])
    with torch.no_grad():
        automatic = model(pixels[1:2])
        reference = model(pixels, modality=torch.tensor([1, int(automatic.modality[0]), 3]))
    outputs = dict(zip(OUTPUT_NAMES, session.run(None, {"pixel_values": pixels.numpy(), "modality": given.numpy()})))
    np.testing.assert_array_equal(outputs["decoded_modality"], reference.modality.numpy())
    np.testing.assert_allclose(outputs["pred_masks"], reference.pred_masks.numpy(), atol=1e-4, rtol=0)


def test_export_refuses_to_overwrite_and_does_not_change_the_model(exported):
    model, path = exported
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(model, path)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, path.with_name("other.onnx"), batch_size=1)
