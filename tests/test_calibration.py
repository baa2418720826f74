"""The "auto" object size chosen on validation images after stage 3 (training.calibration): the candidates span
the upper half of the training range, the smallest size within the tolerance of the best validation Dice wins,
test images are never used, and a stage-3 release carries the chosen size in its image processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from esp_medsam_hf.data.synthetic import synthetic_domains
from esp_medsam_hf.training import EspMedSamStageConfig
from esp_medsam_hf.training import calibration
from esp_medsam_hf.training.augment import ZoomRange
from esp_medsam_hf.training.calibration import calibrate_object_size, candidate_sizes
from esp_medsam_hf.training.stages import run_espmedsam

pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidates_run_from_the_middle_to_near_the_top_of_the_range():
    sizes = candidate_sizes([ZoomRange("object_size", 6, 40)])
    assert sizes[0] == pytest.approx(15.5, abs=0.1) and sizes[-1] == pytest.approx(32.0, abs=0.1)
    assert len(sizes) == 4 and all(a < b for a, b in zip(sizes, sizes[1:]))
    assert candidate_sizes([ZoomRange("object_size", 20, 20)]) == [20.0]


class _Prediction:
    def __init__(self, mask, logits=None):
        self.masks = [mask]
        self.logits = [np.where(mask, 1.0, -1.0) if logits is None else logits]


def _fake_predict(best: float, calls: list):
    """A stand-in for ``prediction.predict`` that is right only with the image processor's size ``best``."""
    def predict(model, processor, images, modality, scale, backend=None):
        size = processor.image_processor.modality_object_sizes[modality]
        calls.append(size)
        truth = images[0][..., 0] > 127
        return _Prediction(truth if size == best else ~truth)
    return predict


def _split(rows: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [np.where(rng.random((32, 32))[..., None] > 0.5, 200, 20).astype(np.uint8).repeat(3, -1)
              for _ in range(rows)]
    return Dataset.from_dict({"image": images, "mask": [(i[..., 0] > 127).astype(np.uint8) for i in images],
                              "modality": [4] * rows})


def _processor():
    from esp_medsam_hf import EspMedSamConfig
    from esp_medsam_hf.training.stages.shared import make_processor

    return make_processor(64, EspMedSamConfig.tiny().modality_names)


def test_the_best_validation_dice_wins_and_test_images_are_not_used(monkeypatch):
    processor = _processor()
    zoom = {"nuclei": ZoomRange("object_size", 6, 40)}
    best = candidate_sizes(list(zoom.values()))[2]
    calls: list = []
    monkeypatch.setattr(calibration, "predict", _fake_predict(best, calls))
    data = {"nuclei": DatasetDict(validation=_split(2, 0), test=_split(5, 1))}
    found = calibrate_object_size(None, processor, data, zoom)
    assert found["object_size"] == best and found["candidates"][best] == pytest.approx(100.0)
    assert found["images"] == 2 and found["views"] == 2 * len(calibration.CALIBRATION_ZOOMS)
    assert len(calls) == 4 * found["views"]  # every candidate on every validation view, no test image
    assert found["modalities"] == ["microscopy"]
    assert processor.image_processor.modality_object_sizes is None  # the caller saves the choice
    # ties, and gains within the tolerance, go to the smaller (cheaper) size
    monkeypatch.setattr(calibration, "predict", lambda model, processor, images, modality, scale, backend=None:
                        _Prediction(images[0][..., 0] > 127))
    assert calibrate_object_size(None, processor, data, zoom)["object_size"] == candidate_sizes(list(zoom.values()))[0]
    gains = dict(zip(candidate_sizes(list(zoom.values())), (95.0, 95.6, 96.0, 96.2)))
    monkeypatch.setattr(calibration, "dice_score", lambda mask, reference: gains[processor_sizes[-1]])
    processor_sizes: list = []
    monkeypatch.setattr(calibration, "predict", lambda model, trial, images, modality, scale, backend=None: (
        processor_sizes.append(trial.image_processor.modality_object_sizes[modality]),
        _Prediction(images[0][..., 0] > 127))[1])
    assert calibrate_object_size(None, processor, data, zoom)["object_size"] == list(gains)[2]  # 96.0 >= 96.2 - 0.25
    # nothing to calibrate on
    assert calibrate_object_size(None, processor, {"nuclei": DatasetDict(test=_split(2, 1))}, zoom) is None
    assert calibrate_object_size(None, processor, data, {"nuclei": ZoomRange("scale", 0.5, 2)}) is None


def _stage_3(folder, zoom: dict, **options) -> EspMedSamStageConfig:
    """A one-epoch stage 3 of a tiny model into ``folder``."""
    return EspMedSamStageConfig(output_dir=str(folder), init_from=None, model_size="tiny", image_size=64, epochs=1,
                                batch_size=2, progress=False, zoom=zoom, **options)


def test_a_stage_3_release_carries_the_chosen_object_size(tmp_path):
    data = synthetic_domains(["dsb"], {"train": 2, "validation": 1}, seed=0, size=64)
    config = _stage_3(tmp_path / "run", {"dsb": {"object_size": [6, 40]}})
    result = run_espmedsam(config, data=data)
    saved = json.loads((result.release_dir / "preprocessor_config.json").read_text())
    assert saved["object_size"] == 16.0  # other modalities keep the default
    assert saved["modality_object_sizes"] == {"microscopy": result.metrics["object_size"]}
    assert saved["modality_mask_thresholds"] == {"microscopy": result.metrics["mask_threshold"]}
    assert saved["modality_min_object_fractions"] == {"microscopy": result.metrics["min_object_fraction"]}
    assert result.metrics["min_object_fraction"] in (0.0, calibration.SMALL_BODY_FRACTION)
    assert set(result.metrics["small_bodies_validation_dice"]) == {"0", "0.333"}
    assert result.metrics["mask_threshold"] in calibration.MASK_THRESHOLDS
    assert result.metrics["object_size"] in candidate_sizes([ZoomRange("object_size", 6, 40)])
    assert set(result.metrics["object_size_validation_dice"]) == {f"{s:g}" for s in candidate_sizes(
        [ZoomRange("object_size", 6, 40)])}
    off = _stage_3(tmp_path / "off", {"dsb": {"object_size": [6, 40]}}, calibrate_object_size=False)
    result = run_espmedsam(off, data=data)
    assert json.loads((result.release_dir / "preprocessor_config.json").read_text()).get("modality_object_sizes") is None
    assert "object_size" not in result.metrics


def test_the_mask_threshold_is_chosen_on_the_validation_views_at_the_chosen_size(monkeypatch):
    """Logits one unit too generous at the border: the threshold that removes that rim wins; logits already right
    keep SAM's 0 (the closest to 0 within the tolerance)."""
    processor = _processor()
    zoom = {"nuclei": ZoomRange("object_size", 6, 40)}
    data = {"nuclei": DatasetDict(validation=_split(2, 0))}

    def wide(model, trial, images, modality, scale, backend=None):
        truth = images[0][..., 0] > 127
        from scipy import ndimage

        rim = ndimage.binary_dilation(truth) & ~truth
        return _Prediction(truth | rim, np.where(truth, 3.0, np.where(rim, 0.4, -3.0)))

    monkeypatch.setattr(calibration, "predict", wide)
    found = calibrate_object_size(None, processor, data, zoom)
    assert found["thresholds"][0.5] == pytest.approx(100.0) and found["thresholds"][0.0] < 100.0
    assert found["mask_threshold"] == 0.5  # the smallest threshold above the rim's 0.4
    monkeypatch.setattr(calibration, "predict", lambda model, trial, images, modality, scale, backend=None:
                        _Prediction(images[0][..., 0] > 127))
    assert calibrate_object_size(None, processor, data, zoom)["mask_threshold"] == 0.0


def _nuclei_and_specks(specks_marked: bool) -> Dataset:
    """64-px images of nuclei 7 px across every 10 px with a 1-px speck between each four, all bright; the masks
    mark the specks or not."""
    yy, xx = np.mgrid[:64, :64]
    nuclei = ((yy % 10 - 5) ** 2 + (xx % 10 - 5) ** 2) <= 9
    specks = (yy % 10 == 0) & (xx % 10 == 0)
    image = np.repeat(np.where(nuclei | specks, 220, 20).astype(np.uint8)[..., None], 3, -1)
    mask = (nuclei | specks) if specks_marked else nuclei
    return Dataset.from_dict({"image": [image] * 2, "mask": [mask.astype(np.uint8)] * 2, "modality": [4] * 2})


@pytest.mark.parametrize("specks_marked", [False, True])
def test_small_bodies_are_removed_unless_that_lowers_the_validation_dice(monkeypatch, specks_marked):
    """A model that marks every bright body: where the masks leave the specks out, removing bodies under a third of
    the nuclei's width raises the validation Dice and is chosen; where the masks mark them, it is not."""
    monkeypatch.setattr(calibration, "predict", lambda model, trial, images, modality, scale, backend=None:
                        _Prediction(images[0][..., 0] > 127))
    data = {"nuclei": DatasetDict(validation=_nuclei_and_specks(specks_marked))}
    found = calibrate_object_size(None, _processor(), data, {"nuclei": ZoomRange("object_size", 6, 40)})
    kept, removed = found["small_bodies"][0.0], found["small_bodies"][calibration.SMALL_BODY_FRACTION]
    if specks_marked:
        assert kept == pytest.approx(100.0) and removed < kept and found["min_object_fraction"] == 0.0
    else:
        assert removed == pytest.approx(100.0) and kept < removed
        assert found["min_object_fraction"] == calibration.SMALL_BODY_FRACTION


def _photos(sizes: list[tuple[int, int]], modality: int = 3) -> Dataset:
    images = [np.zeros((height, width, 3), dtype=np.uint8) for height, width in sizes]
    return Dataset.from_dict({"image": images, "mask": [image[..., 0] for image in images],
                              "modality": [modality] * len(images)})


def test_a_scale_domain_is_tiled_at_its_training_resolution():
    data = {"photos": DatasetDict(train=_photos([(32, 48), (40, 40), (64, 30)]), test=_photos([(500, 500)])),
            "nuclei": DatasetDict(train=_photos([(90, 90)], modality=4))}
    # the median longest side of the training images (48 px) at the middle of the scale range
    assert calibration.native_long_sides(data, {"photos": ZoomRange("scale", 0.5, 2)}) == {"fundus": 48}
    assert calibration.native_long_sides(data, {"photos": ZoomRange("scale", 1, 4)}) == {"fundus": 96}
    # object-size domains are calibrated on validation views instead; a domain without training images gives nothing
    assert calibration.native_long_sides(data, {"nuclei": ZoomRange("object_size", 6, 40)}) == {}
    assert calibration.native_long_sides({"photos": DatasetDict(test=_photos([(8, 8)]))},
                                         {"photos": ZoomRange("scale", 0.5, 2)}) == {}


def test_a_stage_3_release_tiles_a_scale_domain_at_its_training_resolution(tmp_path):
    data = synthetic_domains(["retinal"], {"train": 2, "validation": 1}, seed=0, size=64)
    config = _stage_3(tmp_path / "run", {"retinal": {"scale": [0.5, 2]}})
    result = run_espmedsam(config, data=data)
    saved = json.loads((result.release_dir / "preprocessor_config.json").read_text())
    assert saved["modality_long_sides"] == {"fundus": 64} == result.metrics["long_sides"]
    assert saved.get("modality_object_sizes") is None  # no object-size domain, nothing calibrated
