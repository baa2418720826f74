"""The scale table (data/scale_table.py): the zoomed views, the rows beside Otsu, and the report's Markdown."""

from __future__ import annotations

import numpy as np
import pytest

from _inference_helpers import pointwise_model, single_thread
from esp_medsam_hf.data.evaluation import write_report
from esp_medsam_hf.data.scale_table import scale_table, scale_table_markdown, zoom_view

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
    assert "our x1 mask, cut like the view" in text


def test_our_x1_mask_cut_like_each_view_separates_the_view_from_the_scale():
    """``x1_cut`` scores the model's x1 masks cropped (or tiled) like each view: a miss outside the centre crops
    counts at x0.5 and x1 but not at x2 or x4, and the model's own x1 row repeats its Dice."""
    model, processor = pointwise_model()
    image, mask = _cells()
    missed = mask.copy()
    missed[:16, :16] = False  # a corner cell the x1 mask misses: outside the x2 and x4 crops
    table = scale_table(model, processor, [(image, mask)], "microscopy", x1_masks=[missed])
    cut = {row["label"]: row["x1_cut"] for row in table["rows"]}
    assert cut["x1"] == pytest.approx(cut["x0.5"], abs=1e-9) and 90 < cut["x1"] < 99  # 15 of 16 cells
    assert cut["x2"] == pytest.approx(100.0) and cut["x4"] == pytest.approx(100.0)
    own = scale_table(model, processor, [(image, mask)], "microscopy", extra_views=False)
    x1 = own["rows"][1]  # measured by the table itself: its masks are the ones cut
    assert x1["label"] == "x1" and x1["x1_cut"] == pytest.approx(x1["dice"], abs=1e-9)
    none = scale_table(model, processor, [(image, mask)], "microscopy", zooms=(2.0,), extra_views=False)
    assert none["rows"][0]["x1_cut"] is None  # no x1 masks given and no x1 row measured
    assert "| n/a |" in scale_table_markdown({"cells": none})
