"""The scale table (data/scale_table.py): the zoomed views, the rows beside Otsu, and the report's Markdown."""

from __future__ import annotations

import numpy as np
import pytest

from _inference_helpers import pointwise_model, single_thread
from esp_medsam_hf.data.evaluation import write_report
from esp_medsam_hf.data.scale_table import scale_table, zoom_view

_threads = pytest.fixture(scope="module", autouse=True)(single_thread)


def _cells(size: int = 64, radius: int = 5) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for cy in range(8, size, 16):
        for cx in range(8, size, 16):
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    image = np.where(mask, 220, 20).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=-1), mask


def test_zoom_views():
    image, mask = _cells()
    mosaic, mosaic_mask = zoom_view(image, mask, 0.5)
    assert mosaic.shape == (128, 128, 3) and np.array_equal(mosaic_mask[64:, 64:], mask)
    crop, crop_mask = zoom_view(image, mask, 4.0)
    assert crop.shape == (16, 16, 3) and np.array_equal(crop_mask, mask[24:40, 24:40])
    assert zoom_view(image, mask, 1.0)[0] is image
    with pytest.raises(ValueError, match="zoom"):
        zoom_view(image, mask, 0.25)


def test_scale_table_rows_beside_otsu_and_in_the_report(tmp_path):
    model, processor = pointwise_model()
    table = scale_table(model, processor, [_cells()], "microscopy")
    labels = [row["label"] for row in table["rows"]]
    assert labels == ["x0.5", "x1", "x2", "x4", "x1, whole view", "x1, native pixels in tiles"]
    for row in table["rows"]:  # a threshold at half the range is right on these cells at every view
        assert row["dice"] > 90 and row["otsu"] > 95, row
    assert table["rows"][4]["scales"] == [None] and table["rows"][5]["scales"] == [1.0]
    report = {"split": "test", "domains": {}, "summary": {}, "num_images": 0, "seconds": 1.0, "images_per_second": 0.0,
              "model_images_per_second": 0.0, "scale_tables": {"cells": table}}
    write_report(report, tmp_path / "out")
    text = (tmp_path / "out" / "results.md").read_text()
    assert "## Dice at other magnifications" in text and "| x0.5 | default |" in text
