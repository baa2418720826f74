"""The reference methods beside the model: LiteMedSAM with ground-truth boxes decodes each (image, reference) once
when reports share one instance, and hands out copies; reference_methods uses the instance it is given."""

from __future__ import annotations

import numpy as np

from esp_medsam_hf.data import baselines
from esp_medsam_hf.data.baselines import LiteMedSamBoxes, reference_methods


def _counting_boxes(calls: list) -> LiteMedSamBoxes:
    boxes = object.__new__(LiteMedSamBoxes)  # the decode is counted, not run: no weights needed
    boxes._masks = {}
    boxes._decode = lambda image, reference: (calls.append(1), reference.copy())[1]
    return boxes


def test_each_image_is_decoded_once_and_callers_get_copies():
    calls: list = []
    boxes = _counting_boxes(calls)
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    reference = np.zeros((20, 30), bool)
    reference[5:9, 4:12] = True
    first = boxes(image, reference)
    first[:] = False  # a caller's change does not reach the remembered mask
    assert np.array_equal(boxes(image.copy(), reference.copy()), reference) and len(calls) == 1
    other = reference.copy()
    other[0, 0] = True
    boxes(image, other)
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    boxes(changed, reference)
    assert len(calls) == 3  # another reference or another image is decoded again


def test_reference_methods_share_the_instance_given(monkeypatch):
    calls: list = []
    boxes = _counting_boxes(calls)
    monkeypatch.setattr(baselines, "LiteMedSamBoxes", lambda: (_ for _ in ()).throw(AssertionError("new instance")))
    methods = reference_methods(litemedsam=boxes)
    image = np.zeros((8, 8, 3), np.uint8)
    reference = np.eye(8, dtype=bool)
    methods["litemedsam-boxes"](image, reference, "microscopy")
    boxes(image, reference)
    assert set(methods) == {"otsu", "litemedsam-boxes"} and len(calls) == 1
