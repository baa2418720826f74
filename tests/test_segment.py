"""``esp-medsam segment``: files and folders (real and SYNTHETIC images, DICOM, 16-bit PNG, a broken file), masks,
overlays and the CSV, no overwriting without --overwrite, and the exit codes."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from _inference_helpers import save_tiny_model, single_thread, write_dicom
from esp_medsam_hf import assets
from esp_medsam_hf.cli import main
from esp_medsam_hf.data.synthetic import synthetic_example
from esp_medsam_hf.inference import check_model_location, collect_inputs, load_pipeline, run_segmentation


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("segment") / "model")


@pytest.fixture()
def inputs(tmp_path):
    """A folder of images in every layout the command meets, plus one image outside it (given as a file)."""
    folder = tmp_path / "scans"
    (folder / "real").mkdir(parents=True)
    (folder / "synthetic" / "sub").mkdir(parents=True)
    (folder / ".cache").mkdir()
    shutil.copy(assets.DSB2018_IMAGE.path(), folder / "real" / "dsb.tif")
    Image.fromarray(synthetic_example("isic", 0, split="test", size=48)[0]).save(folder / "synthetic" / "isic.png")
    xray = synthetic_example("lung", 0, split="test", size=40)[0][..., 0].astype(np.uint16) * 200
    Image.fromarray(xray).save(folder / "synthetic" / "sub" / "lung16.png")
    write_dicom(folder / "us.dcm", np.arange(36 * 28, dtype=np.uint16).reshape(36, 28), Modality="US")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / ".cache" / "hidden.png")
    histology = tmp_path / "histo.jpg"
    shutil.copy(assets.HISTOLOGY_IMAGE.path(), histology)
    return folder, histology


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_segment_folder_and_file(saved, inputs, tmp_path):
    folder, histology = inputs
    out = tmp_path / "out"
    code = main(["segment", str(folder), str(histology), "--model", str(saved), "--output", str(out),
                 "--batch-size", "3", "--no-progress"])
    assert code == 1  # the broken file failed; every other image was segmented
    rows = _rows(out / "segmentation.csv")
    names = [row["file"].split("/")[-1] for row in rows]
    assert names == ["broken.png", "dsb.tif", "isic.png", "lung16.png", "us.dcm", "histo.jpg"]
    broken = rows[0]
    assert broken["status"] == "error" and "broken.png" in broken["error"] and broken["mask"] == ""
    assert not (out / "broken_mask.png").exists()
    for row in rows[1:]:
        assert row["status"] == "ok", row
        mask = np.asarray(Image.open(row["mask"]))
        picture = Image.open(row["overlay"])
        assert mask.shape == (int(row["height"]), int(row["width"])) and set(np.unique(mask)) <= {0, 255}
        assert picture.mode == "RGB" and picture.size == (mask.shape[1], mask.shape[0])
        assert int(row["mask_area"]) == int((mask == 255).sum())
        assert float(row["mask_fraction"]) == pytest.approx(mask.mean() / 255, abs=1e-5)
        assert 0 <= float(row["modality_probability"]) <= 1 and float(row["seconds"]) > 0
    by_name = dict(zip(names, rows))
    assert (by_name["us.dcm"]["modality"], by_name["us.dcm"]["modality_source"]) == ("ultrasound", "file")
    assert {by_name[n]["modality_source"] for n in ("dsb.tif", "isic.png", "histo.jpg")} == {"classifier"}
    assert (by_name["dsb.tif"]["height"], by_name["dsb.tif"]["width"]) == ("512", "512")
    assert (out / "synthetic" / "sub" / "lung16_mask.png").is_file()  # folder structure is kept
    assert (out / "histo_overlay.png").is_file()


def test_given_modality_wins_over_dicom_tag(saved, inputs, tmp_path):
    folder, _ = inputs
    (folder / "broken.png").unlink()
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--model", str(saved), "--output", str(out), "--modality", "x-ray",
                 "--no-progress"]) == 0
    rows = _rows(out / "segmentation.csv")
    assert {(row["modality"], row["modality_source"]) for row in rows} == {("x-ray", "given")}
    assert len(rows) == 4


def test_never_overwrites_without_flag(saved, inputs, tmp_path):
    folder, _ = inputs
    out = tmp_path / "out"
    args = ["segment", str(folder), "--model", str(saved), "--output", str(out), "--no-progress"]
    assert main(args) == 1
    csv_path, mask = out / "segmentation.csv", out / "real" / "dsb_mask.png"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (csv_path, mask)}
    assert main(args) == 2  # the CSV exists: nothing is done
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before
    csv_path.unlink()
    assert main(args) == 1  # images whose outputs exist are reported, not replaced
    rows = _rows(csv_path)
    assert all(row["status"] == "error" for row in rows)
    assert "exists" in rows[1]["error"] and "--overwrite" in rows[1]["error"]
    assert mask.stat().st_mtime_ns == before[mask][1]
    assert main([*args, "--overwrite"]) == 1
    rows = _rows(csv_path)
    assert [row["status"] for row in rows].count("ok") == 4 and mask.stat().st_mtime_ns != before[mask][1]
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temporary files


def test_bad_paths_and_arguments(saved, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "nowhere"), "--model", str(saved), "--output", str(out)]) == 2
    assert main(["segment", str(tmp_path), "--model", str(saved), "--modality", "mri", "--output", str(out)]) == 2
    assert not (out / "segmentation.csv").exists()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "same.png")
    with pytest.raises(ValueError, match="same_mask.png"):
        collect_inputs([tmp_path / "a", tmp_path / "b"])


def test_a_model_path_that_is_not_a_folder_is_named(tmp_path, caplog):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for model in (tmp_path / "no-model", "./no-model", "runs/demo/no-model"):
        caplog.clear()
        assert main(["segment", str(image), "--model", str(model), "--output", str(tmp_path / "out")]) == 2
        assert f"model {str(model)!r}: no such folder" in caplog.text
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline(str(tmp_path / "no-model"))
    check_model_location("owner/name")  # a Hub repo id is the Hub's to answer
    check_model_location(tmp_path)  # an existing folder


def test_run_segmentation_single_process_split_and_gather(saved, inputs, tmp_path):
    """accelerate's PartialState in one process: the split holds every input, the CSV keeps the input order."""
    folder, histology = inputs
    (folder / "broken.png").unlink()
    pipe = load_pipeline(str(saved), device="cpu")
    records = run_segmentation([histology, folder], pipe, tmp_path / "out", batch_size=2, progress=False)
    assert [r.file.split("/")[-1] for r in records] == ["histo.jpg", "dsb.tif", "isic.png", "lung16.png", "us.dcm"]
    assert [row["file"] for row in _rows(tmp_path / "out" / "segmentation.csv")] == [r.file for r in records]


def test_dicom_without_suffix_is_found_by_its_preamble_and_no_progress_is_quiet(saved, tmp_path, capfd):
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom(folder / "IM0001", np.arange(30 * 20, dtype=np.uint16).reshape(30, 20), Modality="US")
    (folder / "README").write_text("not an image")
    assert [item.path.name for item in collect_inputs([folder])] == ["IM0001"]
    capfd.readouterr()
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--model", str(saved), "--output", str(out), "--no-progress"]) == 0
    (row,) = _rows(out / "segmentation.csv")
    assert row["file"].endswith("IM0001") and row["status"] == "ok"
    assert (row["modality"], row["modality_source"], row["height"], row["width"]) == ("ultrasound", "file", "30", "20")
    assert "it/s" not in capfd.readouterr().err  # no tqdm bar: neither weight loading nor segmentation


def test_an_existing_csv_or_a_file_as_output_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch, caplog):
    import esp_medsam_hf.inference as inference

    def no_work(*args, **kwargs):
        raise AssertionError("segment loaded the model before checking its output")

    monkeypatch.setattr(inference, "load_pipeline", no_work)
    out = tmp_path / "out"
    out.mkdir()
    (out / "segmentation.csv").write_text("mine")
    assert main(["segment", str(tmp_path), "--model", "unused", "--output", str(out)]) == 2
    assert "segmentation.csv exists; pass --overwrite" in caplog.text
    (tmp_path / "file").write_text("mine")
    assert main(["segment", str(tmp_path), "--model", "unused", "--output", str(tmp_path / "file")]) == 2
    assert "is a file; expected a folder" in caplog.text
    assert (out / "segmentation.csv").read_text() == "mine"
