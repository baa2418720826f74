"""Native-resolution tiled inference (prediction.predict): one tile reproduces the whole view, blending has no
seams, automatic scale follows the objects' size, options round-trip and bad values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _inference_helpers import pointwise_model, single_thread, tiny_model
from esp_medsam_hf import EspMedSamImageProcessor
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import segment
from esp_medsam_hf.models.esp_medsam.object_sizes import estimate_object_size
from esp_medsam_hf.models.esp_medsam.prediction import TilingOptions, choose_scale, predict, tiling_options

_threads = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture()
def pointwise():
    return pointwise_model()


def test_one_tile_reproduces_the_whole_view(tiny):
    model, processor = tiny
    image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    whole = predict(model, processor, [image], "microscopy", scale="whole")
    size = processor.image_processor.size["height"]
    tiled = predict(model, processor, [image], "microscopy", scale=size / 80)
    assert whole.scales == [None] and tiled.scales == [pytest.approx(size / 80)]
    # the same pixels go through the same forward: equal up to float rounding of the Gaussian blend
    torch.testing.assert_close(tiled.logits[0], whole.logits[0], rtol=0, atol=1e-5)


def test_blending_has_no_seams(pointwise):
    model, processor = pointwise
    constant = np.full((150, 230, 3), 200, dtype=np.uint8)
    result = predict(model, processor, [constant], 0, scale=1.0, overlap=16)  # 4 x 5 tiles of 64 px
    logits = result.logits[0]
    assert logits.shape == (150, 230)
    assert float(logits.max() - logits.min()) < 1e-5 and bool(result.masks[0].all())
    # a pointwise model tiled equals the model on the whole image everywhere, tile borders included
    ramp = np.repeat(np.linspace(0, 255, 230, dtype=np.float64)[None, :, None], 150, 0).repeat(3, 2).astype(np.uint8)
    tiled = predict(model, processor, [ramp], 0, scale=1.0, overlap=16).logits[0]
    expected = torch.from_numpy(4.0 * (ramp[..., 0] / 255.0 - 0.5)).float()
    torch.testing.assert_close(tiled, expected, rtol=0, atol=1e-4)


def _blobs(radius: int, size: int = 256, spacing: int | None = None) -> np.ndarray:
    spacing = spacing or 4 * radius
    yy, xx = np.mgrid[:size, :size]
    image = np.zeros((size, size), dtype=np.uint8)
    for cy in range(spacing // 2, size, spacing):
        for cx in range(spacing // 2, size, spacing):
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 255
    return np.repeat(image[..., None], 3, axis=-1)


def test_object_size_is_the_inscribed_diameter():
    size, count = estimate_object_size(_blobs(radius=10)[..., 0] > 0)
    assert count == 36 and size == pytest.approx(20, abs=2)
    assert estimate_object_size(np.zeros((8, 8), bool)) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_auto_zooms_in_more_for_small_objects(pointwise):
    model, processor = pointwise
    small = predict(model, processor, [_blobs(radius=3)], 0, scale="auto")
    large = predict(model, processor, [_blobs(radius=12)], 0, scale="auto")
    assert small.scales[0] is not None and large.scales[0] is not None
    assert small.scales[0] > 1.5 * large.scales[0]
    assert small.object_sizes[0] == pytest.approx(6, abs=2) and large.object_sizes[0] == pytest.approx(24, abs=3)
    # objects the model's size already: the whole view is kept; large structures are not zoomed out below it
    assert choose_scale(16.0, 10, 0.25, 16.0) is None
    assert choose_scale(60.0, 1, 0.25, 16.0) is None and choose_scale(60.0, 10, 0.25, 16.0) is None
    assert choose_scale(60.0, 10, 0.25, 16.0, zoom_out=True) < 0.25


def test_a_calibrated_modality_zooms_out_a_close_up_of_few_objects():
    """In a modality with its own object size (nuclei), one or two large objects are a close-up: "auto" zooms out;
    in another (an organ, a polyp, blobs over a fundus photograph) the whole view stays, however many."""
    options = TilingOptions("auto", None, 64, 16, 16.0, 64, {"microscopy": 20.0})
    nuclei, organ = options.for_modality("microscopy"), options.for_modality("x-ray")
    assert (nuclei.object_size, nuclei.object_domain) == (20.0, True)
    assert (organ.object_size, organ.object_domain) == (16.0, False)
    assert choose_scale(60.0, 2, 0.5, organ.object_size, organ.object_domain) is None
    assert choose_scale(60.0, 12, 0.5, organ.object_size, organ.object_domain) is None
    assert choose_scale(60.0, 2, 0.5, nuclei.object_size, nuclei.object_domain) == pytest.approx(0.5 * 20 / 60)
    # small objects are zoomed in everywhere; sizes within the tolerance keep the whole view in both
    assert choose_scale(4.0, 12, 0.5, organ.object_size, organ.object_domain) == pytest.approx(0.5 * 16 / 4)
    assert choose_scale(22.0, 1, 0.5, nuclei.object_size, nuclei.object_domain) is None


def test_a_calibrated_modality_takes_native_pixels_within_the_tolerance():
    """Where the objects' native size is within AUTO_TOLERANCE of the model's, nuclei are segmented at the native
    pixels (factor 1, no resampling) instead of a nearby factor or an enlarged whole view; other modalities and
    sizes outside the tolerance keep the rule before it."""
    nuclei = TilingOptions("auto", None, 64, 16, 16.0, 64, {"microscopy": 20.0}).for_modality("microscopy")
    # a small crop enlarged x2 in its whole view, its nuclei 30 px there (15 native): native, not the whole view
    assert choose_scale(30.0, 5, 2.0, nuclei.object_size, nuclei.object_domain) == 1.0
    # nuclei 12 px in a whole view at x0.5 (24 native): native instead of x0.83
    assert choose_scale(12.0, 5, 0.5, nuclei.object_size, nuclei.object_domain) == 1.0
    # nuclei 7 px in a whole view at x0.5 (14 native): x1.43 brings them to 20 px, native pixels are within the
    # tolerance; a modality without its own size keeps its factor
    assert choose_scale(7.0, 5, 0.5, nuclei.object_size, nuclei.object_domain) == 1.0
    assert choose_scale(7.0, 5, 0.5, 16.0) == pytest.approx(0.5 * 16 / 7)
    # native nuclei of 40 px (native pixels x2 off, outside the tolerance): the whole view where they are 20 px
    # there, else zoomed out
    assert choose_scale(20.0, 5, 0.5, nuclei.object_size, nuclei.object_domain) is None
    assert choose_scale(80.0, 5, 2.0, nuclei.object_size, nuclei.object_domain) == pytest.approx(0.5)


def test_masks_keep_the_logits_above_the_modalitys_calibrated_threshold(pointwise, tmp_path):
    model, processor = pointwise
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.float64)[None, :, None], 8, 0).repeat(3, 2).astype(np.uint8)
    name = model.config.modality_names[0]
    default = predict(model, processor, [ramp], 0, scale="whole")
    processor.image_processor.modality_mask_thresholds = {name: 1.0}
    try:
        raised = predict(model, processor, [ramp], 0, scale="whole")
        processor.image_processor.save_pretrained(tmp_path)
        assert EspMedSamImageProcessor.from_pretrained(tmp_path).modality_mask_thresholds == {name: 1.0}
        processor.image_processor.modality_mask_thresholds = {name: float("nan")}
        with pytest.raises(ValueError, match="modality_mask_thresholds"):
            predict(model, processor, [ramp], 0, scale="whole")
    finally:
        processor.image_processor.modality_mask_thresholds = None
    torch.testing.assert_close(raised.logits[0], default.logits[0])  # the logits are the model's, only the cut moves
    assert np.array_equal(default.masks[0], default.logits[0].numpy() > 0)
    assert np.array_equal(raised.masks[0], raised.logits[0].numpy() > 1.0) and raised.masks[0].sum() < default.masks[0].sum()


def test_options_round_trip_through_save_and_load(tmp_path):
    processor = EspMedSamImageProcessor(
        size={"height": 64, "width": 64}, inference_scale="30px", tile_size=48, tile_overlap=8, object_size=12.0,
        keep_aspect_ratio=False, intensity_percentiles=[2.0, 98.0],
    )
    processor.save_pretrained(tmp_path)
    loaded = EspMedSamImageProcessor.from_pretrained(tmp_path)
    for name in ("inference_scale", "tile_size", "tile_overlap", "object_size", "keep_aspect_ratio"):
        assert getattr(loaded, name) == getattr(processor, name)
    assert list(loaded.intensity_percentiles) == [2.0, 98.0]
    assert tiling_options(loaded) == tiling_options(processor)
    assert tiling_options(loaded).mode == "object" and tiling_options(loaded).value == 30.0


@pytest.mark.parametrize(
    ("options", "name"),
    [({"tile_size": 0}, "tile_size"), ({"tile_size": -64}, "tile_size"), ({"overlap": 64}, "overlap"),
     ({"overlap": -1}, "overlap"), ({"scale": 0}, "scale"), ({"scale": "-3px"}, "scale"), ({"scale": "big"}, "scale")],
)
def test_bad_options_name_the_argument(tiny, options, name):
    model, processor = tiny
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=name):
        predict(model, processor, [image], 0, **options)
    with pytest.raises(ValueError, match=name):
        segment(image, model, processor.image_processor, modality=0, **options)


def test_pipeline_goes_through_the_front_door(tiny):
    model, processor = tiny
    image = np.random.default_rng(1).integers(0, 256, (40, 90, 3), dtype=np.uint8)
    direct = predict(model, processor, [image], "microscopy", scale=2.0, overlap=8)
    [result] = segment(image, model, processor.image_processor, modality="microscopy", scale=2.0, overlap=8)
    assert result["scale"] == 2.0
    np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, direct.masks[0])  # predict's mask
    # a mask_threshold thresholds the same logits as probabilities
    [result] = segment(image, model, processor.image_processor, modality="microscopy", scale=2.0, overlap=8,
                       mask_threshold=0.7)
    np.testing.assert_array_equal(np.asarray(result["mask"]) > 0, (torch.sigmoid(direct.logits[0]) >= 0.7).numpy())


def test_a_modality_object_size_changes_only_that_modality(pointwise):
    model, processor = pointwise  # it decodes every image as modality 0
    image = _blobs(radius=12)
    names = model.config.modality_names
    default = predict(model, processor, [image], 0, scale="auto").scales[0]
    scales = {}
    try:
        for name in (names[4], names[0]):
            processor.image_processor.modality_object_sizes = {name: 3.0}
            scales[name] = predict(model, processor, [image], 0, scale="auto").scales[0]
        assert tiling_options(processor.image_processor).for_modality(names[0]).object_size == 3.0
        assert tiling_options(processor.image_processor).for_modality(names[4]).object_size == 16.0
    finally:
        processor.image_processor.modality_object_sizes = None
    assert scales[names[4]] == default  # another modality's size leaves this one at the default
    assert scales[names[0]] == pytest.approx(default * 3 / 16, rel=0.05)  # objects brought to 3 px, not 16


@pytest.mark.parametrize("sizes", [{"microscopy": 0}, {"microscopy": float("nan")}, {"microscopy": "big"}, [4]])
def test_bad_modality_object_sizes_are_named(sizes):
    processor = EspMedSamImageProcessor(size={"height": 64, "width": 64}, modality_object_sizes=sizes)
    with pytest.raises(ValueError, match="modality_object_sizes"):
        tiling_options(processor)


def test_a_modality_long_side_tiles_it_at_that_resolution_without_a_coarse_pass(tiny, monkeypatch):
    from esp_medsam_hf.models.esp_medsam import prediction

    model, processor = tiny
    image = np.random.default_rng(3).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    processor.image_processor.modality_long_sides = {"fundus": 128}
    try:
        at_factor = predict(model, processor, [image], "fundus", scale=0.64, overlap=8)
        whole_views = []
        original = prediction._whole_view
        monkeypatch.setattr(prediction, "_whole_view", lambda *a, **k: whole_views.append(1) or original(*a, **k))
        auto = predict(model, processor, [image], "fundus", scale="auto", overlap=8)
        assert whole_views == []  # the modality is given and has a long side: no coarse pass
        assert auto.scales == [pytest.approx(128 / 200)] and auto.object_sizes == [None]
        torch.testing.assert_close(auto.logits[0], at_factor.logits[0], rtol=0, atol=0)
        other = predict(model, processor, [image], "microscopy", scale="auto", overlap=8)
        assert whole_views == [1]  # another modality keeps the coarse pass of "auto"
        predict(model, processor, [image], None, scale="auto", overlap=8)
        assert whole_views == [1, 1]  # without a modality the whole view's classifier chooses it first
    finally:
        processor.image_processor.modality_long_sides = None
    assert other.scales == predict(model, processor, [image], "microscopy", scale="auto", overlap=8).scales


def test_modality_long_sides_round_trip_and_bad_values_are_named(tmp_path):
    processor = EspMedSamImageProcessor(size={"height": 64, "width": 64}, modality_long_sides={"fundus": 1024})
    processor.save_pretrained(tmp_path)
    assert EspMedSamImageProcessor.from_pretrained(tmp_path).modality_long_sides == {"fundus": 1024}
    assert tiling_options(processor).for_modality("fundus").long_side == 1024.0
    assert tiling_options(processor).for_modality("microscopy").long_side is None
    for sides in ({"fundus": 0}, {"fundus": 1.5}, {"fundus": "big"}, [4]):
        with pytest.raises(ValueError, match="modality_long_sides"):
            tiling_options(EspMedSamImageProcessor(size={"height": 64, "width": 64}, modality_long_sides=sides))
