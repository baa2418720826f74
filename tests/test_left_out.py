"""Bodies a dataset's masks leave out on purpose (mnfinder's micronuclei): Dice with a don't-care region, the
scale table's column of what marking them costs, mnfinder's micronucleus masks, and scripts/mnfinder_micronuclei.py."""

from __future__ import annotations

import numpy as np
import pytest

from _inference_helpers import pointwise_model, save_tiny_model
from _script_helpers import load_script
from esp_medsam_hf.data.left_out import grown, left_out_markdown, left_out_scores
from esp_medsam_hf.data.real import MNFINDER_ARCHIVE, left_out_masks, mnfinder_micronuclei, prepare_real_domains
from esp_medsam_hf.data.prepared import load_domains
from esp_medsam_hf.data.scale_table import scale_table, scale_table_markdown, scale_table_summary, scale_tables
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


def test_scale_table_scores_each_view_with_the_left_out_bodies_as_dont_care():
    model, processor = pointwise_model()  # marks every pixel brighter than half the range
    shape = (64, 64)
    nucleus, micronucleus = disc(shape, (28, 28), 10), disc(shape, (36, 46), 4)
    image = np.repeat(np.where(nucleus | micronucleus, 220, 20).astype(np.uint8)[..., None], 3, axis=-1)
    table = scale_table(model, processor, [(image, nucleus)], "microscopy", zooms=(0.5, 1.0, 2.0), extra_views=False,
                        left_out=("micronuclei", [micronucleus]), margin=1)
    rows = table["rows"]
    assert table["left_out"] == "micronuclei" and [row["zoom"] for row in rows] == [0.5, 1.0, 2.0]
    x1 = rows[1]
    assert x1["dice"] == pytest.approx(dice_score(nucleus | micronucleus, nucleus), abs=0.5)
    assert x1["dice_dont_care"] == pytest.approx(100.0, abs=0.5) and x1["false_positive_share"] > 95
    for row in rows:  # the resized views blur the outlines by a pixel: the same picture within tolerance
        assert row["dice"] < row["dice_dont_care"] - 1 and row["dice_dont_care"] > 97
        assert row["false_positive_share"] > 80
    exact = scale_table(model, processor, [(image, nucleus | micronucleus)], "microscopy", zooms=(1.0,),
                        extra_views=False, left_out=("micronuclei", [micronucleus]))["rows"][0]
    assert exact["false_positive_share"] is None and exact["dice"] > 99  # nothing marked beyond the reference
    assert " - |" in left_out_markdown([exact], "micronuclei")
    text = left_out_markdown(rows, "micronuclei", 1)
    assert "| x1 | " in text and "Micronuclei grown by 1 px" in text and text.count("\n| x") == 3
    page = scale_table_markdown({"mnfinder": table})
    assert "| Dice % (ours, micronuclei don't care) |" in page and "'micronuclei don't care'" in page
    assert f"| {x1['dice_dont_care']:.2f} | " in page
    plain = scale_table(model, processor, [(image, nucleus)], "microscopy", zooms=(1.0,), extra_views=False)
    assert plain["left_out"] is None and "dice_dont_care" not in plain["rows"][0]
    assert "don't care" not in scale_table_markdown({"x": plain})
    summary = scale_table_summary({"mnfinder": table, "x": plain})
    assert summary["mnfinder"]["rows"][1]["dice_dont_care"] == x1["dice_dont_care"]
    assert "dice_dont_care" not in summary["x"]["rows"][0]


def test_a_known_row_takes_the_x1_masks_and_bad_left_out_masks_are_refused():
    model, processor = pointwise_model()
    nucleus, micronucleus = disc((64, 64), (28, 28), 10), disc((64, 64), (36, 46), 4)
    image = np.repeat(np.where(nucleus | micronucleus, 220, 20).astype(np.uint8)[..., None], 3, axis=-1)
    known = {"zoom": 1.0, "scale": "default", "dice": 1.0, "otsu": 2.0, "per_image": [1.0], "scales": [None]}
    left_out = ("micronuclei", [micronucleus])
    without = scale_table(model, processor, [(image, nucleus)], "microscopy", zooms=(1.0,), extra_views=False,
                          known=[known], left_out=left_out)["rows"][0]
    assert without["dice"] == 1.0 and without["dice_dont_care"] is None  # taken from known, no masks at hand
    given = scale_table(model, processor, [(image, nucleus)], "microscopy", zooms=(1.0,), extra_views=False,
                        known=[known], x1_masks=[nucleus | micronucleus], left_out=left_out)["rows"][0]
    assert given["dice_dont_care"] == pytest.approx(100.0) and given["false_positive_share"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="1 masks for 2 images"):
        scale_table(model, processor, [(image, nucleus)] * 2, "microscopy", left_out=left_out)
    with pytest.raises(ValueError, match="left-out mask of shape"):
        scale_table(model, processor, [(image, nucleus)], "microscopy", left_out=("m", [micronucleus[:10]]))


def test_left_out_masks_are_optional(monkeypatch, tmp_path, caplog):
    assert left_out_masks("vascx", ["CHASEDB1_12R.png"]) is None
    monkeypatch.setenv("ESP_MEDSAM_ARCHIVES", str(tmp_path))  # no archive at hand: nothing fetched, a warning
    with caplog.at_level("WARNING"):
        assert left_out_masks("mnfinder", ["test/2022-10-14_U2OS/4.png"]) is None
    assert "micronuclei not scored as don't care" in caplog.text and "mnfinder-1.2.3" in caplog.text


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
    what, found = left_out_masks("mnfinder", names)
    assert what == "micronuclei" and all(np.array_equal(a, b) for a, b in zip(found, masks))
    assert left_out_masks("mnfinder", ["mine/1.png"]) is None  # a user's own folder named mnfinder: no column


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
    # esp-medsam evaluate's scale tables look the micronuclei up by the domain's name
    tiny, processor = pointwise_model()
    dataset = load_domains(data, ["mnfinder"], splits={"test": 0})["mnfinder"]
    tables = scale_tables(tiny, processor, {"mnfinder": dataset}, names=["mnfinder"], backend="eager")
    assert tables["mnfinder"]["left_out"] == "micronuclei"
    assert all(row["dice_dont_care"] is not None for row in tables["mnfinder"]["rows"])
