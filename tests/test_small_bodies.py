"""Small bodies (object_sizes.remove_small_bodies, the image processor's ``modality_min_object_fractions``): a body
narrower than a fraction of the image's typical object width leaves the mask at any magnification, a body cut by
the image's border or joined to an object stays, only the modality named loses them, and the setting round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _inference_helpers import pointwise_model
from esp_medsam_hf import EspMedSamImageProcessor
from esp_medsam_hf.models.esp_medsam.pipeline_esp_medsam import segment
from esp_medsam_hf.models.esp_medsam.object_sizes import estimate_object_size, remove_small_bodies
from esp_medsam_hf.models.esp_medsam.prediction import predict
from esp_medsam_hf.models.esp_medsam.prompt_session import EspMedSamPromptSession

pytestmark = pytest.mark.usefixtures("one_thread")

NUCLEI = ((16, 16), (16, 46), (46, 16), (46, 46))
"""Centres of four nuclei of radius 7 (14 px across) in a 64-px field."""


def _disc(mask: np.ndarray, cy: int, cx: int, radius: float) -> None:
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = True


def _field() -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """Four nuclei; a micronucleus 3 px across on its own, one at the border and one joined to a nucleus."""
    mask = np.zeros((64, 64), dtype=bool)
    for cy, cx in NUCLEI:
        _disc(mask, cy, cx, 7)
    bodies = {"alone": (31, 31), "border": (63, 31), "joined": (16, 24)}
    for cy, cx in bodies.values():
        _disc(mask, cy, cx, 1.5)
    return mask, bodies


def test_a_body_under_the_fraction_goes_and_one_at_the_border_or_joined_stays():
    mask, bodies = _field()
    assert estimate_object_size(mask)[0] == pytest.approx(15, abs=2)
    kept = remove_small_bodies(mask, 1 / 3)
    assert not kept[bodies["alone"]] and kept[bodies["border"]] and kept[bodies["joined"]]
    expected = mask.copy()
    expected[30:33, 30:33] = False  # the 3x3 body alone, 4 px wide by its inscribed disc
    assert np.array_equal(kept, expected)
    assert np.array_equal(remove_small_bodies(mask, 0.0), mask)
    assert np.array_equal(remove_small_bodies(mask, 0.2), mask)  # 4 px is more than a fifth of the nuclei's width
    assert not remove_small_bodies(np.zeros((8, 8), bool), 1 / 3).any()


def test_the_fraction_is_relative_to_the_image_so_it_holds_at_any_magnification():
    mask, _ = _field()
    enlarged = np.kron(mask, np.ones((4, 4), dtype=bool))  # x4: the micronucleus is now 12 px across
    assert estimate_object_size(enlarged)[0] > 40
    np.testing.assert_array_equal(remove_small_bodies(enlarged, 1 / 3),
                                  np.kron(remove_small_bodies(mask, 1 / 3), np.ones((4, 4), dtype=bool)))


def test_predict_removes_the_named_modalitys_small_bodies_and_keeps_its_logits(tmp_path):
    model, processor = pointwise_model()  # logits 4 x (intensity - 0.5), every image decoded as modality 0
    mask, bodies = _field()
    image = np.repeat(np.where(mask, 230, 20).astype(np.uint8)[..., None], 3, -1)
    name, other = model.config.modality_names[:2]
    default = predict(model, processor, [image], 0, scale="whole")
    assert np.array_equal(default.masks[0], mask)
    image_processor = processor.image_processor
    image_processor.modality_min_object_fractions = {other: 1 / 3}
    assert np.array_equal(predict(model, processor, [image], 0, scale="whole").masks[0], mask)  # not its modality
    image_processor.modality_min_object_fractions = {name: 1 / 3}
    removed = predict(model, processor, [image], 0, scale="whole")
    torch.testing.assert_close(removed.logits[0], default.logits[0])  # the logits keep the body
    assert np.array_equal(removed.masks[0], remove_small_bodies(mask, 1 / 3)) and not removed.masks[0][bodies["alone"]]
    image_processor.save_pretrained(tmp_path)
    loaded = EspMedSamImageProcessor.from_pretrained(tmp_path)
    assert loaded.modality_min_object_fractions == {name: pytest.approx(1 / 3)}
    assert EspMedSamImageProcessor().modality_min_object_fractions is None  # nothing removed unless asked


def test_the_pipeline_gives_predicts_mask_with_its_threshold_and_without_small_bodies():
    """The pipeline's default mask is predict's (the modality's calibrated threshold, small bodies removed); a
    mask_threshold it is given thresholds the probabilities instead, and the small bodies still go."""
    model, processor = pointwise_model()
    mask, bodies = _field()
    image = np.repeat(np.where(mask, 230, 20).astype(np.uint8)[..., None], 3, -1)
    image[bodies["border"]] = image[bodies["joined"]] = 140  # logit 4 x (140 / 255 - 0.5) = 0.2: a dim body
    image_processor = processor.image_processor
    name = model.config.modality_names[0]
    image_processor.modality_min_object_fractions = {name: 1 / 3}
    image_processor.modality_mask_thresholds = {name: 0.5}
    [result] = segment(image, model, image_processor, modality=0, scale="whole", backend="eager")
    direct = predict(model, processor, [image], 0, scale="whole")
    assert np.array_equal(np.asarray(result["mask"]) > 0, direct.masks[0])
    assert not direct.masks[0][bodies["alone"]] and not direct.masks[0][bodies["border"]]  # under the threshold
    [result] = segment(image, model, image_processor, modality=0, scale="whole", backend="eager", mask_threshold=0.5)
    kept = np.asarray(result["mask"]) > 0
    assert kept[bodies["border"]] and not kept[bodies["alone"]]
    assert np.array_equal(kept, remove_small_bodies(torch.sigmoid(direct.logits[0]).numpy() >= 0.5, 1 / 3))


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), "a third", True])
def test_bad_fractions_are_named(value):
    model, processor = pointwise_model()
    processor.image_processor.modality_min_object_fractions = {model.config.modality_names[0]: value}
    with pytest.raises(ValueError, match=r"modality_min_object_fractions\[.*\[0, 1\)"):
        predict(model, processor, [np.zeros((64, 64, 3), np.uint8)], 0, scale="whole")


@pytest.mark.parametrize("scale", ["whole", 1.0])
def test_a_prompt_sessions_free_mask_is_predicts_without_small_bodies(scale):
    """The interactive session starts from predict's mask, whole view or tiles: without the small bodies, so that
    the click curve's first point is the evaluation's prompt-free Dice."""
    model, processor = pointwise_model()
    mask, bodies = _field()
    image = np.repeat(np.where(mask, 230, 20).astype(np.uint8)[..., None], 3, -1)
    processor.image_processor.modality_min_object_fractions = {model.config.modality_names[0]: 1 / 3}
    session = EspMedSamPromptSession(model, processor, image, 0, scale=scale)
    direct = predict(model, processor, [image], 0, scale=scale)
    assert np.array_equal(session.free_mask, direct.masks[0])
    assert not session.free_mask[bodies["alone"]] and session.free_mask[bodies["joined"]]
    assert np.array_equal(session.mask(points=[], labels=[]), direct.masks[0])
