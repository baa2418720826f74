"""Prompted evaluation: simulated clicks, the click curve, box Dice and the written report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _inference_helpers import single_thread, tiny_model
from esp_medsam_hf.data.interactive import click_at_largest_error, click_curve, evaluate_interactive
from esp_medsam_hf.data.synthetic import synthetic_domains
from esp_medsam_hf.models.esp_medsam.prompt_session import EspMedSamPromptSession


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def test_click_goes_to_the_centre_of_the_largest_error():
    reference = np.zeros((40, 60), dtype=bool)
    reference[5:15, 5:15] = True  # found
    reference[20:35, 30:50] = True  # missed: 300 pixels
    prediction = reference.copy()
    prediction[20:35, 30:50] = False
    prediction[2:6, 50:58] = True  # extra: 32 pixels
    x, y, label = click_at_largest_error(prediction, reference)  # 8 px from the border: x in 37..42, y = 27
    assert label == 1 and 37 <= x <= 42 and y == 27
    prediction[20:35, 30:50] = True
    x, y, label = click_at_largest_error(prediction, reference)
    assert label == 0 and 50 <= x < 58 and 2 <= y < 6
    assert click_at_largest_error(reference, reference) is None


class FakeSession:
    """A session whose mask obeys the clicks exactly: a positive click fills its region, a negative one clears it."""

    def __init__(self, free_mask, reference):
        self.free_mask, self.reference = free_mask, reference

    def mask(self, points, labels):
        from scipy import ndimage

        mask = self.free_mask.copy()
        for (x, y), label in zip(points, labels):
            error = (self.reference & ~mask) if label == 1 else (mask & ~self.reference)
            regions, _ = ndimage.label(error, structure=np.ones((3, 3)))
            mask[regions == regions[y, x]] = bool(label)
        return mask


def test_click_curve_records_the_dice_after_each_click():
    reference = np.zeros((40, 60), dtype=bool)
    reference[5:15, 5:15] = reference[20:35, 30:50] = True
    free = np.zeros_like(reference)
    free[5:15, 5:15] = free[0:3, 0:3] = True
    curve = click_curve(FakeSession(free, reference), reference, clicks=3)
    assert len(curve) == 4 and curve[0] < curve[1] < curve[2] == curve[3] == 100.0


def test_evaluate_interactive_writes_the_table_and_the_plot(tmp_path):
    model, processor = tiny_model(seed=1)
    data = synthetic_domains(["isic"], {"test": 2}, size=48)
    report = evaluate_interactive(model, processor, data, tmp_path, clicks=2, progress=False,
                                  litemedsam=lambda image, reference: reference)
    summary = report["domains"]["isic"]
    assert summary["num_images"] == 2 and len(summary["curve"]) == 3 and summary["dice_litemedsam_boxes"] == 100.0
    image = summary["images"][0]
    row = data["isic"]["test"][0]
    session = EspMedSamPromptSession(model, processor, np.asarray(row["image"]), row["modality"])
    assert image["curve"][0] == pytest.approx(image["dice"])
    assert session.free_mask.shape == np.asarray(row["mask"]).shape[:2]
    assert "| isic | 2 |" in (tmp_path / "interactive.md").read_text()
    assert json.loads((tmp_path / "interactive.json").read_text())["clicks"] == 2
    assert (tmp_path / "interactive_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_the_interactive_report_reuses_the_evaluations_predictions(tmp_path, monkeypatch):
    """``evaluate_model(predictions=...)`` keeps each image's prediction; the interactive report given them segments
    no image again (``predict`` is not called) and reports what it reports without them."""
    from esp_medsam_hf.data.evaluation import evaluate_model
    from esp_medsam_hf.models.esp_medsam import prediction

    model, processor = tiny_model(seed=1)
    processor.image_processor.inference_scale = 1.0  # native pixels in tiles: the sessions' own predict path
    data = synthetic_domains(["isic"], {"test": 2}, size=48)
    predictions: dict = {}
    report = evaluate_model(model, processor, data, compute_hausdorff=False, progress=False, predictions=predictions)
    names = [entry["file_name"] for entry in report["domains"]["isic"]["per_image"]]
    assert sorted(predictions) == sorted(("isic", name) for name in names)
    assert all(len(p.masks) == 1 and p.scales == [1.0] for p in predictions.values())
    without = evaluate_interactive(model, processor, data, tmp_path / "a", clicks=2, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("predict called although the evaluation's prediction was given")

    monkeypatch.setattr(prediction, "predict", refuse)
    given = evaluate_interactive(model, processor, data, tmp_path / "b", clicks=2, progress=False,
                                 predictions=predictions)
    assert given["domains"]["isic"]["images"] == without["domains"]["isic"]["images"]
