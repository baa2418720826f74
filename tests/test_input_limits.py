"""Bounded and well-formed inputs (issue 13): one pixel limit for every reader, checked from the header before
decoding; NaN/inf pixels repaired with a warning instead of a black image or NaN logits; thin images read as
H x W; clear errors for a float modality and for labels that are not 0/1."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from _inference_helpers import write_dicom
from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
from esp_medsam_hf.models.esp_medsam import image_reading as imaging
from esp_medsam_hf.data.prepare import PreparationError, read_image
from esp_medsam_hf.models.esp_medsam.image_reading import ImageLoadError, load_image
from esp_medsam_hf.models.esp_medsam.losses import mask_and_patch_losses


def _zero_tiles(count: int, tile: int = 512):
    block = np.zeros((tile, tile), np.uint8)
    for _ in range(count):
        yield block


def test_zlib_tiled_tiff_bomb_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 15000 x 15000 zlib-tiled TIFF of a few hundred KB: refused before a single tile is decoded."""
    path = tmp_path / "bomb.tif"
    side, tile = 15000, 512
    tiles = ((side + tile - 1) // tile) ** 2
    tifffile.imwrite(path, _zero_tiles(tiles, tile), shape=(side, side), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib")
    assert path.stat().st_size < 2_000_000
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: decoded.append(1))
    with pytest.raises(ImageLoadError, match=r"bomb\.tif.*15000 x 15000 pixels exceeds the limit"):
        load_image(path)
    with pytest.raises(PreparationError, match=r"bomb\.tif: image .*exceeds the limit"):
        read_image(path)
    assert decoded == []


@pytest.mark.parametrize("kind", ["png", "tiff", "dicom"])
def test_one_limit_for_every_reader(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", 30 * 40 - 1)
    pixels = np.zeros((30, 40), np.uint16)
    path = tmp_path / f"big.{ 'dcm' if kind == 'dicom' else kind}"
    if kind == "png":
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    elif kind == "tiff":
        tifffile.imwrite(path, pixels, tile=(16, 16), compression="zlib")
    else:
        write_dicom(path, pixels)
    with pytest.raises(ImageLoadError, match=rf"big\.\w+.*40 x 30 pixels exceeds the limit of 1,199"):
        load_image(path)
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", 30 * 40)
    assert load_image(path)[0].shape == (30, 40, 3)


def test_dicom_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((4, 4), np.uint8), Rows=15000, Columns=15000)
    with pytest.raises(ImageLoadError, match=r"huge\.dcm.*15000 x 15000"):
        load_image(path)


def test_prepare_names_an_oversize_png_so_skip_invalid_can_skip_it(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((10, 11), np.uint8)).save(tmp_path / "large.png")
    assert read_image(tmp_path / "ok.png").shape == (10, 10, 3)
    with pytest.raises(PreparationError, match=r"large\.png: image of 11 x 10 pixels exceeds"):
        read_image(tmp_path / "large.png")


def test_float_tiff_with_one_inf_pixel_is_not_read_as_black(tmp_path, caplog):
    data = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    data[3, 4] = np.inf
    tifffile.imwrite(tmp_path / "inf.tif", data)
    with caplog.at_level(logging.WARNING, logger="esp_medsam_hf.models.esp_medsam.image_intensity"):
        image, _ = load_image(tmp_path / "inf.tif")
    assert "inf.tif: 1 pixel(s) are NaN or infinite" in caplog.text
    assert image[..., 0].max() == 255 and image[0, 0, 0] == 0 and image[11, 15, 0] == 255
    assert image[3, 4, 0] == 255  # +inf -> the brightest finite value


def test_nan_pixel_in_a_float_image_is_repaired_with_a_warning(tmp_path, caplog):
    data = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    data[5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data)
    with caplog.at_level(logging.WARNING):
        image, _ = load_image(tmp_path / "nan.tif")
    assert "nan.tif" in caplog.text and image[5, 5, 0] == 0 and image[11, 15, 0] == 255


def test_an_image_with_no_finite_pixel_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "void.tif", np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ImageLoadError, match=r"void\.tif: no finite pixel"):
        load_image(tmp_path / "void.tif")


def test_processor_repairs_nan_and_inf_with_a_warning_so_the_logits_stay_finite(caplog):
    config = EspMedSamConfig.tiny()
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval()
    processor = EspMedSamImageProcessor(size={"height": config.image_size, "width": config.image_size})
    image = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    image[7, 9, 1] = np.nan
    image[8, 9, 0] = -np.inf
    with caplog.at_level(logging.WARNING):
        inputs = processor(image, return_tensors="pt")
    assert "2 pixel(s) are NaN or infinite" in caplog.text
    assert torch.isfinite(inputs["pixel_values"]).all()
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], modality=torch.tensor([0]))
    assert torch.isfinite(out.pred_masks).all()
    with pytest.raises(ValueError, match="no finite pixel"):
        processor(np.full((8, 8), np.inf, np.float32), return_tensors="pt")


@pytest.mark.parametrize("height", [1, 3, 4])
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_thin_images_are_read_height_by_width(height, channels):
    processor = EspMedSamImageProcessor(size={"height": 32, "width": 32})
    shape = (height, 50) if channels is None else (height, 50, channels)
    image = np.random.default_rng(height).integers(0, 256, shape, dtype=np.uint8)
    inputs = processor(image, return_tensors="pt")
    assert inputs["original_sizes"].tolist() == [[height, 50]]
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_thin_16_bit_image_from_disk_keeps_its_orientation(tmp_path):
    tifffile.imwrite(tmp_path / "thin.tif", np.arange(3 * 50, dtype=np.uint16).reshape(3, 50))
    image, _ = load_image(tmp_path / "thin.tif")
    assert image.shape == (3, 50, 3)
    inputs = EspMedSamImageProcessor(size={"height": 32, "width": 32})(image, return_tensors="pt")
    assert inputs["original_sizes"].tolist() == [[3, 50]]


def test_channels_first_tensors_are_still_channels_first():
    processor = EspMedSamImageProcessor(size={"height": 32, "width": 32})
    inputs = processor(torch.rand(3, 20, 30), return_tensors="pt")
    assert inputs["original_sizes"].tolist() == [[20, 30]]


@pytest.mark.parametrize("modality", [1.7, 2.0, True, [0, 0.5]])
def test_processor_refuses_a_modality_that_is_not_a_name_or_integer(modality):
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": 32, "width": 32}))
    images = [np.zeros((8, 8, 3), np.uint8)] * (2 if isinstance(modality, list) else 1)
    with pytest.raises(TypeError, match="modality must be a name .* or an integer index, got"):
        processor(images, modality=modality)
    assert processor(images, modality=np.int64(1) if not isinstance(modality, list) else [0, 1])["modality"].tolist()


@pytest.mark.parametrize("bad", [255.0, float("nan"), -1.0, 0.5])
def test_labels_must_be_zero_or_one(bad):
    pred = torch.zeros(1, 1, 8, 8)
    patches = torch.zeros(1, 1, 2, 2)
    labels = torch.zeros(1, 1, 16, 16)
    labels[0, 0, :4, :4] = bad
    with pytest.raises(ValueError, match="labels must be binary masks of 0 and 1"):
        mask_and_patch_losses(pred, patches, labels, 0.5)
    labels[labels != 0] = 1
    mask_loss, patch_loss = mask_and_patch_losses(pred, patches, labels, 0.5)
    assert mask_loss.item() > 0 and patch_loss.item() > 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_pixel_values_that_are_not_floating_point_are_a_clear_error(dtype):
    model = EspMedSamModel(EspMedSamConfig.tiny()).eval()
    size = model.config.image_size
    with pytest.raises(TypeError, match=f"pixel_values has dtype {dtype} but must be floating point"):
        model(pixel_values=torch.zeros(1, 3, size, size, dtype=dtype), modality=torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_floating_pixel_values_of_another_precision_are_cast(dtype):
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny()).eval()
    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(pixel_values=pixels, modality=torch.tensor([0])).pred_masks
        got = model(pixel_values=pixels.to(dtype), modality=torch.tensor([0])).pred_masks
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)


def test_nan_pixel_values_are_refused_by_the_model():
    model = EspMedSamModel(EspMedSamConfig.tiny()).eval()
    pixels = torch.zeros(1, 3, model.config.image_size, model.config.image_size)
    pixels[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="pixel_values hold NaN or inf"):
        model(pixel_values=pixels, modality=torch.tensor([0]))


def test_prepare_skip_invalid_skips_an_oversize_image(tmp_path, monkeypatch):
    from _data_helpers import build_replica, save

    from esp_medsam_hf.data.prepare import build_domain

    root = tmp_path / "raw"
    names, _, _ = build_replica(root, "official", "tnbc")
    name = names["train"][0]
    save(np.zeros((20, 25, 3), np.uint8), root / "image_1024" / name)
    save(np.zeros((20, 25), np.uint8), root / "mask_1024" / name)
    monkeypatch.setattr(imaging, "MAX_IMAGE_PIXELS", 20 * 24)
    with pytest.raises(PreparationError, match=rf"{name}: image of 25 x 20 pixels exceeds the limit"):
        build_domain("tnbc", root, cache_dir=tmp_path / "cache", progress=False)
    dataset_dict, report = build_domain("tnbc", root, cache_dir=tmp_path / "cache2", skip_invalid=True, progress=False)
    assert name not in dataset_dict["train"]["file_name"]
    assert report.skipped[0]["file_name"] == name and "exceeds the limit" in report.skipped[0]["reason"]



@pytest.mark.parametrize("height", [1, 3, 4])
def test_a_thin_array_gives_the_pixels_of_the_same_image_as_a_tensor(height):
    """H x W x 3 numpy (as load_image gives it) and the unambiguous 3 x H x W tensor: the same pixel values."""
    processor = EspMedSamImageProcessor(size={"height": 32, "width": 32})
    image = np.random.default_rng(height).integers(0, 256, (height, 50, 3), dtype=np.uint8)
    from_array = processor(image, return_tensors="pt")["pixel_values"]
    from_tensor = processor(torch.from_numpy(image).permute(2, 0, 1), return_tensors="pt")["pixel_values"]
    assert torch.equal(from_array, from_tensor)
