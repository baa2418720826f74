"""Bodies a dataset's masks leave out on purpose (mnfinder's micronuclei): Dice with a don't-care region, the
per-zoom table of what marking them costs, mnfinder's micronucleus masks, and scripts/mnfinder_micronuclei.py."""

from __future__ import annotations

import numpy as np
import pytest

from _inference_helpers import pointwise_model, save_tiny_model
from _script_helpers import load_script
from esp_medsam_hf.data.left_out import grown, left_out_markdown, left_out_scores, left_out_table
from esp_medsam_hf.data.real import MNFINDER_ARCHIVE, mnfinder_micronuclei, prepare_real_domains
from esp_medsam_hf.metrics.functional import dice_score

needs_mnfinder = pytest.mark.skipif(not MNFINDER_ARCHIVE.path().is_file(),
                                    reason="mnfinder's wheel is fetched by scripts/install.sh")


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def test_dice_with_a_dont_care_region_counts_its_pixels_in_neither_mask():
    reference = np.zeros((10, 10), bool)
    reference[:4] = True  # 40 px
    prediction = reference.copy()
    prediction[8:, :5] = True  # 10 px extra
    assert dice_score(prediction, reference) == pytest.approx(200 * 40 / 90)
    extra = np.zeros((10, 10), bool)
    extra[8:, :5] = True
    assert dice_score(prediction, reference, ignore=extra) == pytest.approx(100.0)
    assert dice_score(prediction, reference, ignore=np.zeros((10, 10), bool)) == dice_score(prediction, reference)
    half = np.zeros((10, 10), bool)
    half[:2] = True  # 20 px of the reference, predicted too: out of both
    assert dice_score(prediction, reference, ignore=half) == pytest.approx(200 * 20 / 50)
    assert dice_score(prediction, reference, ignore=np.ones((10, 10), bool)) == 100.0  # nothing left: both empty
    with pytest.raises(ValueError, match="ignore shape"):
        dice_score(prediction, reference, ignore=np.zeros((5, 5), bool))


def test_left_out_scores_and_growth():
    reference = disc((32, 32), (12, 12), 6)
    body = disc((32, 32), (25, 25), 2)
    prediction = reference | disc((32, 32), (25, 25), 3)  # the model's outline a pixel wider than the hand-drawn one
    scores = left_out_scores(prediction, reference, grown(body, 1))
    assert scores["false_positive"] == int(disc((32, 32), (25, 25), 3).sum())
    assert scores["false_positive_on"] == scores["false_positive"]
    assert scores["dice_dont_care"] == pytest.approx(100.0)
    assert scores["dice"] == pytest.approx(dice_score(prediction, reference))
    assert left_out_scores(prediction, reference, body)["false_positive_on"] < scores["false_positive"]
    assert np.array_equal(grown(body, 0), body)
    assert grown(body, 2).sum() > grown(body, 1).sum() > body.sum()
    with pytest.raises(ValueError, match="margin must be >= 0"):
        grown(body, -1)


def test_left_out_table_measures_what_marking_the_bodies_costs_at_each_zoom():
    model, processor = pointwise_model()  # marks every pixel brighter than half the range
    shape = (64, 64)
    nucleus, micronucleus = disc(shape, (28, 28), 10), disc(shape, (36, 46), 4)
    image = np.repeat(np.where(nucleus | micronucleus, 220, 20).astype(np.uint8)[..., None], 3, axis=-1)
    rows = left_out_table(model, processor, [(image, nucleus)], [micronucleus], "microscopy", zooms=(0.5, 1.0, 2.0),
                          margin=1)
    assert [row["zoom"] for row in rows] == [0.5, 1.0, 2.0]
    x1 = rows[1]
    expected = dice_score(nucleus | micronucleus, nucleus)
    assert x1["dice"] == pytest.approx(expected, abs=0.5)
    assert x1["dice_dont_care"] == pytest.approx(100.0, abs=0.5) and x1["false_positive_share"] > 95
    for row in rows:  # the resized views blur the outlines by a pixel: the same picture within tolerance
        assert row["dice"] < row["dice_dont_care"] - 1 and row["dice_dont_care"] > 97
        assert row["false_positive_share"] > 80 and len(row["per_image"]) == 1
    exact = left_out_table(model, processor, [(image, nucleus | micronucleus)], [micronucleus], "microscopy",
                           zooms=(1.0,))[0]
    assert exact["false_positive_share"] is None and exact["dice"] > 99  # nothing marked beyond the reference
    assert "| x1 | " in left_out_markdown([exact]) and " - |" in left_out_markdown([exact])
    table = left_out_markdown(rows, 1)
    assert "| x1 | " in table and "grown by 1 px" in table and table.count("\n| x") == 3
    with pytest.raises(ValueError, match="1 masks for 2 images"):
        left_out_table(model, processor, [(image, nucleus)] * 2, [micronucleus], "microscopy")
    with pytest.raises(ValueError, match="left-out mask of shape"):
        left_out_table(model, processor, [(image, nucleus)], [micronucleus[:10]], "microscopy")


@needs_mnfinder
def test_mnfinder_micronuclei_are_read_beside_the_nucleus_masks():
    names = ["test/2023-05-31_misc/MCC13_rfpcyto_w1cDAPI_s45.png", "training/2022-10-14_U2OS/1.png"]
    masks = mnfinder_micronuclei(names)
    assert [m.dtype for m in masks] == [np.dtype(bool)] * 2
    assert all(0 < m.mean() < 0.05 for m in masks)  # a few small bodies
    with pytest.raises(FileNotFoundError, match="'test/none/1.png': no micronucleus mask"):
        mnfinder_micronuclei(["test/none/1.png"])
    with pytest.raises(FileNotFoundError, match="<split>/<batch>/<N>.png"):
        mnfinder_micronuclei(["1.png"])


@needs_mnfinder
def test_script_writes_the_table_and_keeps_an_existing_file(tmp_path, capsys):
    script = load_script("mnfinder_micronuclei")
    data = tmp_path / "data"
    prepare_real_domains(["mnfinder"], data, cache=tmp_path / "cache", limit=1, progress=False)
    model = save_tiny_model(tmp_path / "model")
    output = tmp_path / "micronuclei.md"
    common = ["--model", str(model), "--data", str(data), "--no-progress", "--backend", "eager"]
    assert script.main([*common, "--zooms", "1", "4", "--output", str(output)]) == 0
    text = output.read_text()
    assert "mnfinder test (1 images)" in text and "| x1 | " in text and "| x4 | " in text
    assert text in capsys.readouterr().out
    output.write_text("mine")
    assert script.main([*common, "--zooms", "1", "--output", str(output)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and output.read_text() == "mine"
    assert script.main([*common, "--zooms", "0.7"]) == 1
    assert "--zooms must be 0.5 or at least 1, got 0.7" in capsys.readouterr().err
    assert script.main(["--model", str(model), "--data", str(tmp_path / "nothing"), "--no-progress"]) == 1
    assert "mnfinder_micronuclei: error:" in capsys.readouterr().err
