"""evaluate_model on a tiny random model and synthetic data; the written report; the evaluate command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _data_helpers import run_command
from esp_medsam_hf import EspMedSamConfig, EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor
from esp_medsam_hf.commands import evaluate as evaluate_command
from esp_medsam_hf.data.evaluation import below_baseline, error_split, evaluate_model, markdown_table, write_report
from esp_medsam_hf.data.prepare import write_output
from esp_medsam_hf.data.schema import image_to_rgb, mask_to_bool
from esp_medsam_hf.data.synthetic import synthetic_domain, synthetic_domains
from esp_medsam_hf.models.esp_medsam.prediction import predict
from esp_medsam_hf.metrics.functional import dice_score, hausdorff_distance

SIZE = 128


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model = EspMedSamModel(EspMedSamConfig.tiny(image_size=SIZE))
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": SIZE, "width": SIZE}))
    return model, processor


@pytest.fixture(scope="module")
def data():
    return synthetic_domains(["isic", "tnbc"], {"test": 3}, size=96)


@pytest.fixture(scope="module")
def evaluated(model_and_processor, data):
    model, processor = model_and_processor
    model.train()
    cases: dict = {}
    report = evaluate_model(model, processor, data, batch_size=2, cases=cases, progress=False)
    return report, cases


def test_report_numbers_match_an_independent_scoring(model_and_processor, data, evaluated):
    model, processor = model_and_processor
    report, _ = evaluated
    assert model.training  # the caller's mode is restored
    assert set(report["domains"]) == {"isic", "tnbc"} and report["num_images"] == 6
    model.eval()
    for name, dataset_dict in data.items():
        test = dataset_dict["test"]
        images = [image_to_rgb(row["image"]) for row in test]
        predictions = predict(model, processor, images, test["modality"]).masks
        references = [mask_to_bool(row["mask"]) for row in test]
        row = report["domains"][name]
        dice = [dice_score(p, r) for p, r in zip(predictions, references)]
        assert [e["dice"] for e in row["per_image"]] == pytest.approx(dice, abs=1e-9)
        assert row["dice"] == pytest.approx(np.mean(dice), abs=1e-9)
        hd = [hausdorff_distance(p, r)[0] for p, r in zip(predictions, references)]
        finite = [value for value in hd if math.isfinite(value)]
        assert row["hd_undefined"] == len(hd) - len(finite)
        if finite:
            assert row["hd"] == pytest.approx(np.mean(finite), abs=1e-9)
        assert [e["file_name"] for e in row["per_image"]] == test["file_name"]
        assert row["mask_sizes"] == ["96x96"]
    assert report["domains"]["isic"]["role"] == "source" and report["domains"]["tnbc"]["role"] == "unseen"
    assert report["domains"]["tnbc"]["paper"] == {"dice": 64.21, "hd": 248.47}
    assert report["summary"]["source"]["dice"] == pytest.approx(report["domains"]["isic"]["dice"])
    assert report["images_per_second"] > 0


def test_the_backend_users_take_scores_as_the_eager_model(model_and_processor, data, monkeypatch):
    """``backend=None`` (the automatic choice: onnxruntime on a CPU) reaches every forward and gives the eager
    model's Dice within 0.5 points (float32 graphs agree within 1e-4; a random model's logits sit near 0)."""
    pytest.importorskip("onnxruntime")
    from esp_medsam_hf.models.esp_medsam import prediction

    model, processor = model_and_processor
    seen, run = [], prediction.run_inference
    monkeypatch.setattr(prediction, "run_inference", lambda *a, backend=None, **k: (
        seen.append(backend), run(*a, backend=backend, **k))[1])
    eager = evaluate_model(model, processor, data, batch_size=2, progress=False, compute_hausdorff=False)
    assert set(seen) == {"eager"}
    seen.clear()
    users = evaluate_model(model, processor, data, batch_size=2, progress=False, compute_hausdorff=False,
                           backend=None)
    assert set(seen) == {None}
    for name in data:
        assert [e["dice"] for e in users["domains"][name]["per_image"]] == pytest.approx(
            [e["dice"] for e in eager["domains"][name]["per_image"]], abs=0.5)


def test_best_and_worst_cases(evaluated):
    report, cases = evaluated
    for name, pair in cases.items():
        dice = [e["dice"] for e in report["domains"][name]["per_image"]]
        assert pair["best"]["dice"] == max(dice) and pair["worst"]["dice"] == min(dice)
        assert pair["best"]["prediction"].shape == pair["best"]["mask"].shape == (96, 96)


def test_write_report(tmp_path, evaluated):
    report, cases = evaluated
    output = write_report(report, tmp_path / "eval", cases=cases, data_label="SYNTHETIC test data")
    markdown = (output / "results.md").read_text()
    assert "Source domains (paper: Table 3)" in markdown and "Unseen domains, zero-shot (paper: Table 5)" in markdown
    assert "| isic | dermoscopy | 3 |" in markdown and "88.52" in markdown and "248.47" in markdown
    assert "SYNTHETIC" in markdown
    saved = json.loads((output / "results.json").read_text())
    assert saved["domains"]["isic"]["dice"] == pytest.approx(report["domains"]["isic"]["dice"])
    with Image.open(output / "dice_hd.png") as chart:
        assert chart.size[0] > 600
    for name in ("isic", "tnbc"):
        for which in ("best", "worst"):
            with Image.open(output / "cases" / f"{name}_{which}.png") as picture:
                assert picture.size == (3 * 96 * 2 + 8, 96 * 2)  # enlarged x2, three panels
    with pytest.raises(FileExistsError, match="not empty"):
        write_report(report, output)
    write_report(report, output, overwrite=True)
    assert not (output / "cases").exists()


def test_results_json_is_strict_json_with_null_for_undefined_distances(tmp_path, evaluated):
    report, _ = evaluated
    broken = json.loads(json.dumps(report))
    broken["domains"]["isic"]["per_image"][0].update(hd=math.inf, hd95=math.nan)
    output = write_report(broken, tmp_path / "eval")
    saved = json.loads((output / "results.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert saved["domains"]["isic"]["per_image"][0]["hd"] is None
    assert saved["domains"]["isic"]["per_image"][0]["hd95"] is None


def test_markdown_marks_undefined_hausdorff():
    report = {
        "split": "test", "num_images": 2, "seconds": 1.0, "images_per_second": 2.0, "model_images_per_second": 2.0,
        "domains": {"busi": {"role": "unseen", "modality": "ultrasound", "num_images": 2, "dice": 50.0,
                             "hd": 3.0, "hd95": 2.0, "hd_undefined": 1, "paper": {"dice": 61.62, "hd": 199.74},
                             "mask_sizes": ["1024x1024"]}},
        "summary": {},
    }
    table = markdown_table(report)
    assert "| busi | ultrasound | 2 | 50.00 | 61.62 | 3.00 (1 undefined) | 199.74 | 2.00 |" in table


def test_evaluate_command_end_to_end(tmp_path, model_and_processor, capsys):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    code = run_command(
        evaluate_command,
        ["--model", str(tmp_path / "model"), "--domains", "dsb", "colon", "--num-per-split", "2",
         "--size", "64", "--output", str(tmp_path / "eval")],
    )
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(saved["domains"]) == ["dsb", "colon"] and saved["num_images"] == 4
    assert saved["data"].startswith("SYNTHETIC")
    assert (tmp_path / "eval" / "cases" / "colon_worst.png").is_file()
    # a prepared folder as data, and an existing output folder without --overwrite is an error
    write_output(synthetic_domain("ph2", {"test": 2}, size=64), tmp_path / "prepared", "ph2", synthetic=True)
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "prepared")]
    args += ["--output", str(tmp_path / "eval")]
    assert run_command(evaluate_command, args) == 1
    assert "not empty" in capsys.readouterr().err
    assert run_command(evaluate_command, args + ["--overwrite"]) == 0
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(saved["domains"]) == ["ph2"] and saved["domains"]["ph2"]["num_images"] == 2
    assert run_command(evaluate_command, args[:4] + ["--domains", "isic", "--output", str(tmp_path / "e2")]) == 1
    assert "no prepared data for domain 'isic'" in capsys.readouterr().err


def test_evaluate_command_on_the_real_case(tmp_path, model_and_processor):
    pytest.importorskip("tifffile")
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")  # no processor saved: the default one of the model's size is used
    code = run_command(
        evaluate_command,
        ["--model", str(tmp_path / "model"), "--data", "real", "--domains", "dsb-stardist", "--references", "otsu",
         "--no-hausdorff", "--output", str(tmp_path / "eval")],
    )
    assert code == 0
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    row = saved["domains"]["dsb-stardist"]
    assert row["num_images"] == 1 and row["mask_sizes"] == ["512x512"] and row["role"] == "real"
    assert saved["data"].startswith("REAL")
    # Otsu on the same image, beside ours, in the JSON and in the real-image table
    assert 60 < row["references"]["otsu"] < 100 and "dice_otsu" in row["per_image"][0]
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "| dsb-stardist | microscopy | 1 |" in markdown
    # a random model is below Otsu: the report names the image and splits both methods' errors
    entry = row["per_image"][0]
    assert entry["dice"] < entry["dice_otsu"]
    assert "Images where ours is below Otsu (1 of 1), and why" in markdown
    assert f"| {_two(entry['missed'], 1)} / {_two(entry['missed_otsu'], 1)} |" in markdown


def _two(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def test_error_split_counts_missed_and_extra_pixels_in_percent_of_the_mask():
    reference = np.zeros((10, 10), bool)
    reference[:4, :5] = True  # 20 pixels
    prediction = np.zeros((10, 10), bool)
    prediction[:2, :5] = True  # 10 of them found
    prediction[9, :6] = True  # 6 outside
    missed, extra = error_split(prediction, reference)
    assert (missed, extra) == (50.0, 30.0)
    assert all(math.isnan(v) for v in error_split(prediction, np.zeros((10, 10), bool)))


def test_below_baseline_names_each_losing_image_with_the_larger_error():
    def entry(name, dice, otsu, missed, extra):
        return {"file_name": name, "dice": dice, "dice_otsu": otsu, "missed": missed, "extra": extra,
                "missed_otsu": 5.0, "extra_otsu": 5.0}

    rows = [("nuclei", {"per_image": [entry("a.png", 80.0, 90.0, 20.0, 6.0), entry("b.png", 85.0, 90.0, 5.0, 25.0),
                                      entry("c.png", 95.0, 90.0, 1.0, 1.0)]})]
    lines = below_baseline(rows)
    assert lines[0] == "### Images where ours is below Otsu (2 of 3), and why"
    table = "\n".join(lines)
    assert "| nuclei | a.png | 80.00 | 90.00 | 20.0 / 5.0 | 6.0 / 5.0 | ours leaves out mask pixels that Otsu finds |" in table
    assert "| nuclei | b.png | 85.00 | 90.00 | 5.0 / 5.0 | 25.0 / 5.0 | ours marks pixels outside the mask that Otsu leaves out |" in table
    assert "c.png" not in table
    assert below_baseline([("nuclei", {"per_image": [entry("c.png", 95.0, 90.0, 1.0, 1.0)]})]) == [
        "Ours is at or above Otsu on all 1 images.", ""]


def bright_disc(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A fundus-like photo: a bright disc on a darker, noisy background, and its mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2 - seed) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2
    image = rng.normal(70, 10, (size, size, 3)) + 120 * mask[..., None]
    return np.clip(image, 0, 255).astype(np.uint8), mask


def test_otsu_learns_the_polarity_on_training_images_and_says_which():
    import datasets

    from esp_medsam_hf.data.baselines import OtsuReference, reference_methods

    rows = [bright_disc(seed) for seed in range(3)]
    train = datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i, _ in rows],
                                        "mask": [Image.fromarray(m.astype(np.uint8) * 255) for _, m in rows],
                                        "modality": [3, 3, 3]})
    image, mask = bright_disc(4)
    otsu = reference_methods(("otsu",))["otsu"]
    assert isinstance(otsu, OtsuReference)
    assert dice_score(otsu(image, mask, "fundus", domain="disc"), mask) < 5  # fundus's usual: dark targets
    assert "fundus's usual polarity" in otsu.describe("disc", "fundus")
    assert otsu.learn("disc", train) == "bright"
    assert dice_score(otsu(image, mask, "fundus", domain="disc"), mask) > 90
    assert otsu.describe("disc", "fundus") == "bright targets (learnt on 3 training images)"
    assert otsu.polarity("vessels", "fundus") == "dark"  # learnt per domain


def test_a_reference_that_scores_zero_is_flagged_and_no_otsu_claims_nothing():
    from esp_medsam_hf.data.evaluation import reference_table

    entry = {"file_name": "a.png", "dice": 60.0, "dice_otsu": 0.0, "missed": 40.0, "extra": 1.0,
             "missed_otsu": 100.0, "extra_otsu": 0.0}
    row = {"role": "custom", "modality": "fundus", "num_images": 1, "dice": 60.0, "references": {"otsu": 0.0},
           "reference_notes": {"otsu": "dark targets (fundus's usual polarity, not learnt on training images)"},
           "per_image": [entry]}
    text = "\n".join(reference_table({"domains": {"disc": row}}))
    assert "**Warning: Otsu scores 0 on disc**" in text
    assert "- Otsu on disc: dark targets (fundus's usual polarity" in text
    bare = {**row, "references": {}, "reference_notes": {}, "per_image": [{"file_name": "a.png", "dice": 60.0}]}
    text = "\n".join(reference_table({"domains": {"disc": bare}}))
    assert "Otsu" not in text and "Warning" not in text


def test_evaluate_checks_its_options_and_output_before_any_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("evaluate loaded the model before checking its options")

    monkeypatch.setattr(evaluate_command, "load_model", no_work)
    (tmp_path / "model").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.md").write_text("an earlier run")
    base = ["--model", str(tmp_path / "model"), "--output", str(tmp_path / "eval")]
    assert run_command(evaluate_command, base) == 1
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert run_command(evaluate_command, base[:2] + ["--output", str(tmp_path / "new"), "--batch-size", "0"]) == 1
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert run_command(evaluate_command, ["--model", str(tmp_path / "none"), "--output", str(tmp_path / "n")]) == 1
    assert "is not a folder; expected a saved EspMedSamModel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_command(evaluate_command, base + ["--references"])
    assert "expected at least one argument" in capsys.readouterr().err
    assert (tmp_path / "eval" / "results.md").read_text() == "an earlier run" and not (tmp_path / "new").exists()


def test_evaluate_learns_otsus_polarity_on_the_train_split_and_no_references_means_none(
    tmp_path, model_and_processor, capsys
):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_output(synthetic_domain("ph2", {"train": 2, "test": 2}, size=64), tmp_path / "prepared", "ph2",
                 synthetic=True)
    args = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "prepared"), "--no-hausdorff",
            "--no-scale-table"]
    assert run_command(evaluate_command, args + ["--references", "otsu", "--output", str(tmp_path / "a")]) == 0
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["domains"]["ph2"]["reference_notes"]["otsu"].endswith("(learnt on 2 training images)")
    assert run_command(evaluate_command, args + ["--no-references", "--output", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "references" not in saved["domains"]["ph2"]
    assert "Otsu" not in (tmp_path / "b" / "results.md").read_text()
