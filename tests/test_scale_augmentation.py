"""Scale augmentation: object sizes measured from masks, zoom crops that give the asked object size, the span of
sizes a training run sees, photometric changes, the halo beside nuclei, seeded views, the options' checks, and a
feature cache of zoom views that gives the model's own loss."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.training import EspMedSamStageConfig
from esp_medsam_hf.training.augment import (
    Halo,
    Photometric,
    ScaleAugmentation,
    ZoomRange,
    crops_per_epoch,
    object_size,
    parse_zoom,
    training_augmentation,
    zoom_crop,
)
from esp_medsam_hf.training.data import SegmentationDataset
from esp_medsam_hf.training.features import EspMedSamAfterCache, cache_features
from esp_medsam_hf.training.stages.shared import make_processor
from esp_medsam_hf.training.stages.student import apply_freeze

pytestmark = pytest.mark.usefixtures("one_thread")


def disks(shape: tuple[int, int], diameter: float, spacing: int, seed: int = 0) -> np.ndarray:
    """A mask of disks of ``diameter`` px on a grid of ``spacing`` px (jittered by ``seed``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy in range(spacing // 2, shape[0] - spacing // 2, spacing):
        for cx in range(spacing // 2, shape[1] - spacing // 2, spacing):
            jy, jx = rng.uniform(-2, 2, 2)
            mask |= (yy - cy - jy) ** 2 + (xx - cx - jx) ** 2 <= (diameter / 2) ** 2
    return mask


def test_object_size_is_the_diameter_inference_measures():
    assert object_size(disks((300, 300), 20, 50)) == pytest.approx(20, abs=1.5)
    assert object_size(disks((300, 300), 8, 25)) == pytest.approx(8, abs=1.5)
    assert math.isnan(object_size(np.zeros((10, 10), bool)))


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0, 2.0])
def test_a_zoom_crop_scales_the_objects(scale):
    mask = disks((400, 500), 24, 60)
    image = np.where(mask[..., None], 200, 20).astype(np.uint8).repeat(3, -1)
    view, labels = zoom_crop(image, mask, scale, 128, np.random.default_rng(0))
    assert view.shape == (128, 128, 3) and view.dtype == np.uint8 and labels.shape == (128, 128)
    assert object_size(labels) == pytest.approx(24 * scale, rel=0.15, abs=1.5)
    # the labels follow the image: bright pixels are foreground
    assert (view[..., 0][labels] > 110).mean() > 0.9 and (view[..., 0][~labels] < 110).mean() > 0.9


def test_a_zoomed_out_image_sits_on_black():
    mask = disks((100, 60), 10, 30)
    image = np.full((100, 60, 3), 100, np.uint8)
    view, labels = zoom_crop(image, mask, 0.5, 128, np.random.default_rng(1))
    grey = view[..., 0] > 0
    assert grey.sum() == pytest.approx(50 * 30, rel=0.1)  # the image keeps its aspect ratio
    assert not labels[~grey].any()


def test_views_span_the_object_sizes_asked():
    mask = disks((768, 869), 26, 70)
    image = np.where(mask[..., None], 180, 30).astype(np.uint8).repeat(3, -1)
    augmentation = ScaleAugmentation({"nuclei": ZoomRange("object_size", 6, 40)}, 256)
    sizes = [object_size(augmentation(image, mask, "nuclei", 0, np.random.default_rng(seed))[1])
             for seed in range(40)]
    sizes = np.array([s for s in sizes if math.isfinite(s)])
    assert sizes.min() < 9 and sizes.max() > 30 and 5 <= sizes.min() and sizes.max() <= 44
    # log-uniform: about as many views below the geometric middle as above
    assert 0.25 < (sizes < math.sqrt(6 * 40)).mean() < 0.75
    first = augmentation(image, mask, "nuclei", 0, np.random.default_rng(3))
    again = augmentation(image, mask, "nuclei", 0, np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # a domain without a zoom keeps the whole image (flipped or not)
    whole, _ = augmentation(image, mask, "other", 0, np.random.default_rng(0))
    assert whole.shape == image.shape


def test_photometric_changes_are_seeded_and_stay_in_range():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    photometric = Photometric()
    changed = [photometric(image, np.random.default_rng(seed)) for seed in range(6)]
    assert all(c.dtype == np.uint8 and c.shape == image.shape for c in changed)
    assert np.array_equal(changed[0], photometric(image, np.random.default_rng(0)))
    assert any(not np.array_equal(c, image) for c in changed)


def test_a_halo_glows_beside_the_objects_without_marking_their_edges():
    mask = disks((96, 96), 16, 48)
    image = np.where(mask, 200, 10).astype(np.uint8)[..., None].repeat(3, -1)
    halo = Halo(share=1.0, reach=(0.5, 0.5), strength=(0.4, 0.4))
    glowing = halo(image, mask, 16.0, np.random.default_rng(0))
    assert np.array_equal(glowing, halo(image, mask, 16.0, np.random.default_rng(0)))  # seeded
    added = glowing[..., 0].astype(float) - image[..., 0]
    distance = ndimage.distance_transform_edt(~mask)
    near, far = added[(distance > 0) & (distance <= 3)].mean(), added[distance > 12].mean()
    assert near > 25 and far < 0.2 * near  # about 0.4 of the 190 of contrast beside them, fading with distance
    rim_inside = added[mask & (ndimage.distance_transform_edt(mask) <= 2)].mean()
    assert rim_inside == pytest.approx(near, rel=0.35)  # the glow goes over the edge: no dark rim marks the objects
    assert np.array_equal(Halo(share=0.0)(image, mask, 16.0, np.random.default_rng(0)), image)
    assert np.array_equal(halo(image, np.zeros_like(mask), 16.0, np.random.default_rng(0)), image)
    dark_objects = np.where(mask, 10, 200).astype(np.uint8)[..., None].repeat(3, -1)
    assert np.array_equal(halo(dark_objects, mask, 16.0, np.random.default_rng(0)), dark_objects)


def test_only_object_size_domains_get_a_halo():
    """Fundus photographs (a scale domain) are left as they were; nuclei views (an object-size domain) glow."""
    mask = disks((200, 200), 20, 50)
    image = np.where(mask, 220, 20).astype(np.uint8)[..., None].repeat(3, -1)
    zoom = parse_zoom({"nuclei": {"object_size": [20, 20]}, "fundus": {"scale": [1, 1]}})
    plain = ScaleAugmentation(zoom, 64)
    halo = ScaleAugmentation(zoom, 64, halo=Halo(share=1.0))
    for key in range(3):
        a = plain(image, mask, "fundus", key, np.random.default_rng(key))
        b = halo(image, mask, "fundus", key, np.random.default_rng(key))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    a = plain(image, mask, "nuclei", 0, np.random.default_rng(0))
    b = halo(image, mask, "nuclei", 0, np.random.default_rng(0))
    assert np.array_equal(a[1], b[1]) and int(b[0].sum()) > int(a[0].sum())


def test_zoom_options_are_checked():
    assert parse_zoom({"mnfinder": {"object_size": [6, 40]}, "vascx": {"scale": [0.5, 2], "crops": 4}}) == {
        "mnfinder": ZoomRange("object_size", 6.0, 40.0), "vascx": ZoomRange("scale", 0.5, 2.0, crops=4)}
    for bad in ({"x": {"size": [1, 2]}}, {"x": {"scale": [2, 1]}}, {"x": {"scale": [0, 1]}},
                {"x": {"scale": [1, float("nan")]}}, {"x": {"scale": [1]}}, {"x": [1, 2]},
                {"x": {"scale": [1, 2], "crops": 0}}, {"x": {"scale": [1, 2], "crops": 1.5}},
                {"x": {"scale": [1, 2], "object_size": [6, 40]}}, {"x": {"crops": 2}},
                {"x": {"scale": [1, 2], "crop": 2}}):
        with pytest.raises(ValueError, match="zoom"):
            EspMedSamStageConfig(zoom=bad)
    assert EspMedSamStageConfig(zoom={"x": {"scale": [0.5, 2]}}, feature_views=12).feature_views == 12
    with pytest.raises(ValueError, match="feature_views"):
        EspMedSamStageConfig(feature_views=12)
    assert training_augmentation(EspMedSamStageConfig()) is None
    assert training_augmentation(EspMedSamStageConfig(photometric=True)).photometric is not None


def test_crops_show_each_image_of_a_domain_that_many_times_an_epoch(data):
    config = EspMedSamStageConfig(image_size=64, zoom={"dsb": {"scale": [0.5, 2], "crops": 3}})
    rows = SegmentationDataset(data, "train", augment=True, seed=0, scale_augmentation=training_augmentation(config),
                               repeats=crops_per_epoch(config.zoom))
    plain = SegmentationDataset(data, "train")
    dsb = [i for i in range(len(plain)) if plain.rows[i]["domain"] == "dsb"]
    others = [i for i in range(len(plain)) if plain.rows[i]["domain"] != "dsb"]
    assert dsb and others and crops_per_epoch(config.zoom) == {"dsb": 3}
    assert len(rows) == len(others) + 3 * len(dsb)
    shown = [rows.rows[i]["file_name"] for i in range(len(rows))]
    for i in dsb:  # each image three times, and each time its own crop
        name = plain.rows[i]["file_name"]
        copies = [j for j, other in enumerate(shown) if other == name]
        assert len(copies) == 3
        crops = [rows.scaled_view(j, 0)[0] for j in copies]
        assert not np.array_equal(crops[0], crops[1]) and not np.array_equal(crops[1], crops[2])
    assert crops_per_epoch({"dsb": {"scale": [0.5, 2]}}) == {} and crops_per_epoch(None) == {}


def test_a_cache_of_zoom_views_gives_the_models_own_loss(data):
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64))
    apply_freeze(model, [], frozen_encoder_stages=2)
    processor = make_processor(64, model.config.modality_names)
    config = EspMedSamStageConfig(image_size=64, zoom={"dsb": {"scale": [0.5, 2]}}, photometric=True)
    rows = SegmentationDataset(data, "train", augment=True, seed=0, scale_augmentation=training_augmentation(config))
    features = cache_features(model, processor.image_processor, rows, views=5, frozen_stages=2, progress=False)
    assert features.features.shape[:2] == (6, 5)
    heads = EspMedSamAfterCache(model, 2).eval()
    index = 4  # a dsb row: zoomed
    for view in (0, 3):
        image, mask, modality = rows.scaled_view(index, view)
        inputs = processor.image_processor([image], segmentation_maps=[mask.astype(np.uint8)], return_tensors="pt")
        modality = torch.tensor([modality])
        with torch.no_grad():
            expected = model(pixel_values=inputs["pixel_values"], modality=modality, labels=inputs["labels"]).loss
            cached = heads(features.features[index : index + 1, view], features.pooled[index : index + 1, view],
                           modality, features.labels[index : index + 1, view])
        torch.testing.assert_close(cached, expected, rtol=1e-4, atol=1e-5)
    # every view once in five epochs
    for item in range(6):
        shown = set()
        for epoch in range(5):
            features.set_epoch(epoch)
            shown.add(next(v for v in range(5) if torch.equal(features[item]["features"], features.features[item, v])))
        assert shown == set(range(5))


def test_a_partial_field_is_a_small_patch_at_the_scale_asked():
    mask = disks((400, 500), 24, 60)
    image = np.where(mask[..., None], 200, 20).astype(np.uint8).repeat(3, -1)
    view, labels = zoom_crop(image, mask, 0.5, 128, np.random.default_rng(0), field=(0.5, 0.75))
    content = view[..., 0] > 0
    rows, cols = np.nonzero(content)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (64, 96)  # the share of each side
    assert not labels[~content].any()
    assert object_size(labels) == pytest.approx(24 * 0.5, rel=0.2, abs=1.5)  # objects keep the scale asked


def test_some_views_cover_only_part_of_the_input():
    mask = disks((768, 869), 26, 70)
    image = np.where(mask[..., None], 180, 30).astype(np.uint8).repeat(3, -1)
    augmentation = ScaleAugmentation({"nuclei": ZoomRange("object_size", 20, 30)}, 256)
    filled = [(augmentation(image, mask, "nuclei", 0, np.random.default_rng(seed))[0][..., 0] > 0).mean()
              for seed in range(40)]
    partial = np.mean([share < 0.95 for share in filled])
    assert 0.1 < partial < 0.45  # about PARTIAL_VIEW_SHARE of the views, though the image fills the input
    by_scale = ScaleAugmentation({"fundus": ZoomRange("scale", 0.5, 2)}, 256)
    assert all((by_scale(image, mask, "fundus", 0, np.random.default_rng(seed))[0][..., 0] > 0).mean() > 0.99
               for seed in range(20))  # scale domains' views are always full


def test_views_a_short_run_never_shows_are_not_encoded(data):
    from esp_medsam_hf.training.features import shown_view
    from esp_medsam_hf.training.stages.shared import epochs_at_most

    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64))
    apply_freeze(model, [], frozen_encoder_stages=2)
    processor = make_processor(64, model.config.modality_names)
    config = EspMedSamStageConfig(image_size=64, zoom={"dsb": {"scale": [0.5, 2]}})
    rows = SegmentationDataset(data, "train", augment=True, seed=0, scale_augmentation=training_augmentation(config))
    full = cache_features(model, processor.image_processor, rows, views=5, frozen_stages=2, progress=False)
    short = cache_features(model, processor.image_processor, rows, views=5, frozen_stages=2, progress=False, epochs=2)
    assert short.encoded.sum(1).tolist() == [2] * 6 and bool(full.encoded.all())
    for epoch in (0, 1):
        short.set_epoch(epoch)
        full.set_epoch(epoch)
        for index in range(6):
            assert short.encoded[index, shown_view(index, epoch, 5, augment=True, seed=0)]
            # encoded in other batches: equal up to float rounding
            torch.testing.assert_close(short[index]["features"], full[index]["features"], rtol=1e-4, atol=1e-6)
    short.set_epoch(2)
    with pytest.raises(RuntimeError, match="not encoded"):
        [short[index] for index in range(6)]
    # the bound: 6 images at batch 2 are 3 steps an epoch, so 7 steps take at most 3 epochs (never fewer)
    assert epochs_at_most(EspMedSamStageConfig(batch_size=2, max_steps=7, epochs=100), 6) == 3
    assert epochs_at_most(EspMedSamStageConfig(batch_size=2, epochs=4), 6) == 4
    assert epochs_at_most(EspMedSamStageConfig(batch_size=4, max_steps=7, epochs=100), 6) == 4  # 2 batches, 1 step


def test_training_on_images_validates_on_the_zoom_views_a_feature_cache_validates_on(data):
    """With a zoom, a run that does not cache features validates on the same zoom views as one that does (not on
    whole images at the processor's scale, which a zoom-trained target never saw)."""
    from esp_medsam_hf.training.stages.shared import cached_feature_task, dice_validation

    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).eval()
    apply_freeze(model, [], frozen_encoder_stages=2)
    processor = make_processor(64, model.config.modality_names)
    config = EspMedSamStageConfig(image_size=64, zoom={"dsb": {"scale": [0.5, 2]}}, frozen_encoder_stages=2,
                                  cache_features=True, progress=False)
    cached_task, _, _ = cached_feature_task("espmedsam", model, config, data, processor)
    cached = cached_task.validate(cached_task.model)["dice"]
    on_images = dice_validation(model, processor, data, config)
    assert set(on_images) == {"dice", "dice/isic", "dice/dsb"}
    assert on_images["dice"] == pytest.approx(cached, abs=0.1)  # a full forward against cached features
