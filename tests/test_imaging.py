"""esp_medsam_hf.models.esp_medsam.image_reading: image and DICOM loading (every supported format, written small in tmp folders) and the
overlays."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from _inference_helpers import write_dicom
from esp_medsam_hf import EspMedSamImageProcessor, assets
from esp_medsam_hf.drawing import draw_mask, outline, overlay
from esp_medsam_hf.models.esp_medsam.image_reading import ImageLoadError, load_image, stretch_to_uint8, to_rgb_uint8


def _gradient(height=12, width=16, high=65535, dtype=np.uint16) -> np.ndarray:
    return np.linspace(0, high, height * width).reshape(height, width).astype(dtype)


def test_rgb_png_round_trips_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    image, metadata = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image, rgb)
    assert metadata["format"] == "png" and metadata["modality"] is None


def test_greyscale_png_becomes_three_equal_channels(tmp_path):
    grey = np.arange(0, 240, 2, dtype=np.uint8).reshape(8, 15)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    image, metadata = load_image(tmp_path / "g.png")
    assert image.shape == (8, 15, 3) and image.dtype == np.uint8 and image.flags.writeable
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], grey)
    assert metadata["original_mode"] == "L"


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: the colour must still come through
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    image, _ = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_palette_png_is_resolved_to_its_colours(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    picture.save(tmp_path / "p.png")
    image, metadata = load_image(tmp_path / "p.png")
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(image, colours[indices])
    assert metadata["original_mode"] == "P"


def test_16bit_png_is_stretched_like_the_image_processor(tmp_path):
    raw = _gradient(high=4000)  # a 12-bit range stored in 16 bits
    Image.fromarray(raw).save(tmp_path / "x16.png")
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")
    image, _ = load_image(tmp_path / "x16.png")
    low, high = np.percentile(raw.astype(np.float64), [1.0, 99.8], method="inverted_cdf")  # DEFAULT_PERCENTILES
    expected = np.clip(np.floor((raw - low) * 255 / (high - low) + 0.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(image[..., 0], expected)
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    minmax, _ = load_image(tmp_path / "x16.png", percentiles=None)
    np.testing.assert_array_equal(minmax[..., 0], np.floor(raw.astype(np.float64) * 255 / 4000 + 0.5).astype(np.uint8))
    # The image processor stretches raw 16-bit arrays itself with the same percentiles: loading first changes nothing.
    processor = EspMedSamImageProcessor(size={"height": 32, "width": 32})
    from_raw = processor(images=[np.repeat(raw[..., None], 3, axis=-1)], return_tensors="pt")["pixel_values"]
    from_loaded = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_raw, from_loaded, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_16bit_and_float_greyscale_tiff(tmp_path, dtype):
    raw = _gradient(high=1000, dtype=dtype) + dtype(100)
    tifffile.imwrite(tmp_path / "t.tif", raw)
    image, metadata = load_image(tmp_path / "t.tif")
    np.testing.assert_array_equal(image[..., 1], stretch_to_uint8(raw))
    assert image[0, 0, 1] == 0 and image[-1, -1, 1] == 255
    assert metadata["format"] == "tiff" and metadata["original_dtype"] == np.dtype(dtype).name


def test_16bit_rgb_tiff_planar_and_interleaved(tmp_path):
    rgb = np.stack([_gradient(), _gradient()[::-1], np.full((12, 16), 30000, np.uint16)], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tiff", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    expected = stretch_to_uint8(rgb)
    for name in ("rgb.tiff", "planar.tiff"):
        image, _ = load_image(tmp_path / name)
        np.testing.assert_array_equal(image, expected)


def test_to_rgb_uint8_accepts_arrays_and_pil_modes():
    grey_alpha = np.zeros((4, 5, 2), dtype=np.uint8)
    grey_alpha[..., 0] = 77
    np.testing.assert_array_equal(to_rgb_uint8(grey_alpha), np.full((4, 5, 3), 77, np.uint8))
    as_pil = to_rgb_uint8(Image.fromarray(_gradient(high=255, dtype=np.int32), mode="I"))
    assert as_pil.shape == (12, 16, 3) and as_pil[-1, -1, 0] == 255
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 3, 4, 5)))


def test_dicom_rescale_and_window(tmp_path):
    stored = np.array([[0, 100, 200], [300, 400, 500]], dtype=np.uint16)
    # Modality LUT: value = 2 * stored - 100, i.e. -100..900; window centre 400.5, width 401 covers 200..600.
    path = write_dicom(tmp_path / "ct.dcm", stored, Modality="US", RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=400.5, WindowWidth=401)
    image, metadata = load_image(path)
    value = stored * 2.0 - 100
    expected = np.clip((value - 200) / 400, 0, 1) * 255
    np.testing.assert_allclose(image[..., 0], expected, atol=1)
    assert metadata["modality"] == "ultrasound" and metadata["dicom_modality"] == "US"


def test_dicom_voi_lut_sequence_is_used(tmp_path):
    from pydicom.dataset import Dataset

    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add_new("LUTData", "OW", np.array([1000, 0, 3000, 2000], "<u2").tobytes())  # non-monotonic on purpose: only a LUT lookup gives this order
    path = write_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=[lut], Modality="DX")
    image, metadata = load_image(path)
    np.testing.assert_array_equal(image[0, :, 0], [85, 0, 255, 170])
    assert metadata["modality"] == "x-ray"


def test_dicom_monochrome1_is_inverted_and_no_window_stretches(tmp_path):
    stored = np.array([[10, 20], [30, 50]], dtype=np.uint16)
    mono2, _ = load_image(write_dicom(tmp_path / "m2.dcm", stored))
    mono1, metadata = load_image(write_dicom(tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_array_equal(mono2[..., 0], stretch_to_uint8(stored, percentiles=None))  # no window: min-max
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert metadata["photometric_interpretation"] == "MONOCHROME1"
    assert metadata["modality"] is None  # "OT" names no modality: the classifier decides


def test_dicom_colour_without_suffix_is_detected_by_preamble(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "fundus.dcm", rgb, Modality="OP")
    renamed = path.rename(tmp_path / "IM0001")
    image, metadata = load_image(renamed)
    np.testing.assert_array_equal(image, rgb)
    assert metadata["format"] == "dicom" and metadata["modality"] == "fundus"


def test_real_chest_xray_dicom():
    import pydicom

    path = assets.CHEST_XRAY_DICOM.path()
    image, metadata = load_image(path)
    assert image.shape == (1955, 1841, 3) and image.dtype == np.uint8
    assert metadata["modality"] == "x-ray" and metadata["dicom_modality"] == "CR"
    assert metadata["photometric_interpretation"] == "MONOCHROME1"
    # Independent check of window (centre 15000, width 30000, 15 bits) then MONOCHROME1 inversion.
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    windowed = np.clip((raw - 14999.5) / 29999 + 0.5, 0, 1) * 255
    assert np.abs(image[..., 0].astype(np.float64) - (255 - windowed)).max() <= 1
    # Inverted correctly: the lung fields (upper middle left/right) are darker than the mediastinum and bones.
    lungs = image[600:1100, 350:650, 0].mean(), image[600:1100, 1200:1500, 0].mean()
    assert max(lungs) < image[600:1100, 880:960, 0].mean()


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n truncated"])
def test_unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match="broken.png"):
        load_image(path)


@pytest.mark.filterwarnings("ignore:.*VR:UserWarning")
def test_missing_and_broken_dicom_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png.*no such file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(ImageLoadError, match="scan.dcm.*DICOM"):
        load_image(tmp_path / "scan.dcm")


def test_draw_mask_tints_inside_outlines_the_boundary_and_leaves_the_rest():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:30] = True  # touches the right edge: the image's edge is not outlined
    colour = (255, 214, 0)
    picture = draw_mask(image, mask, colour, alpha=0.45, outline_width=2)
    edge = outline(mask, 2)
    assert edge.sum() == 4 * 20 + 2 * 6 and not edge[7:13, 12:].any()
    np.testing.assert_array_equal(picture[~mask], image[~mask])
    np.testing.assert_array_equal(picture[edge], np.broadcast_to(colour, (edge.sum(), 3)))
    inside = mask & ~edge
    expected = (0.55 * image[inside].astype(np.float32) + 0.45 * np.array(colour, np.float32)).astype(np.uint8)
    np.testing.assert_allclose(picture[inside], expected, atol=1)


def test_overlay_outlines_the_prediction_over_the_tinted_ground_truth():
    image = np.full((12, 12), 100, np.uint8)  # greyscale becomes RGB
    truth, prediction = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    truth[2:8, 2:8], prediction[4:10, 4:10] = True, True
    picture = overlay(image, truth, prediction)
    assert picture.shape == (12, 12, 3) and picture.dtype == np.uint8
    assert tuple(picture[9, 9]) == (255, 0, 255) and tuple(picture[2, 2]) == (0, 255, 0)
    assert tuple(picture[0, 0]) == (100, 100, 100) and tuple(picture[5, 5]) == (65, 154, 65)
