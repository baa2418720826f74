"""One rule for every command's outputs (issue 22, rows 1, 3, 14), non-UTF-8 names (row 16), medical metadata
(row 17), user mistakes as one-line errors (row 18) and the converter's weight checks (row 13).

The rule (``fileio.check_clear_of_inputs``): a command deletes or replaces only what it wrote itself; an output that
equals or holds an input is refused before anything is read or written.
"""

from __future__ import annotations

import csv
import os
from types import SimpleNamespace
from unittest.mock import Mock

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from esp_medsam_hf.cli import main
from esp_medsam_hf.conversion import load_checkpoint
from esp_medsam_hf.data.domains import custom_domain
from esp_medsam_hf.data.prepare import build_domain, write_output
from esp_medsam_hf.data.synthetic import synthetic_domain
from esp_medsam_hf.inference import SegmentationRecord, run_segmentation, write_csv


def tree(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def plain_data(root, names=("a", "b", "c"), text: dict | None = None):
    """images/ + masks/ of a user's own domain (8 x 8 PNGs); ``text``: tEXt chunks written into every image."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    for index, name in enumerate(names):
        image = np.full((8, 8, 3), 40 * index, np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png", pnginfo=info)
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def prepare(data, output, domain="mine", *extra):
    return main(["prepare", "--domains", domain, "--modality", "dermoscopy", "--layout", "plain", "--data-dir",
                 str(data), "--output", str(output), *extra])


@pytest.mark.parametrize("layout", ["domain-folder", "same-folder"])
def test_prepare_overwrite_never_deletes_the_data_it_reads(tmp_path, capsys, layout):
    """Row 1: ``--data-dir out/mine --output out`` and ``--domains images --data-dir X --output X``."""
    if layout == "domain-folder":
        output, domain = tmp_path / "out", "mine"
        data = plain_data(output / "mine")
    else:
        output = data = plain_data(tmp_path / "X")
        domain = "images"
    before = tree(data)
    assert prepare(data, output, domain, "--overwrite") == 1
    assert f"--output {output} {'holds' if layout == 'domain-folder' else 'is'} the input {data}" in (
        capsys.readouterr().err)
    assert tree(data) == before


def test_prepare_overwrite_keeps_a_users_readme(tmp_path):
    """Row 3: ``--overwrite`` replaces only what prepare wrote; a user's README.md is not a dataset card."""
    output = tmp_path / "out"
    output.mkdir()
    (output / "README.md").write_text("# My project\n")
    data = synthetic_domain("isic", 1, seed=0, size=32)
    with pytest.raises(FileExistsError, match="README.md is not a dataset card.*--overwrite replaces only"):
        write_output(data, output, "isic", synthetic=True, overwrite=True)
    assert (output / "README.md").read_text() == "# My project\n"
    assert sorted(p.name for p in output.iterdir()) == ["README.md"]


@pytest.mark.parametrize("where", ["same", "parent"])
def test_segment_refuses_an_output_that_is_or_holds_an_input(tmp_path, where):
    """Row 14: ``segment data --output data`` wrote an empty CSV into the input folder and exited 0."""
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / "a.png")
    before = tree(tmp_path)
    pipe = SimpleNamespace(device="cpu")  # refused before the pipeline is used
    output = data if where == "same" else tmp_path
    with pytest.raises(FileExistsError, match=r"--output .* (is|holds) the input"):
        run_segmentation([data], pipe, output, progress=False)
    assert tree(tmp_path) == before


def test_a_non_utf8_file_name_is_written_to_the_csv_escaped(tmp_path):
    """Row 16 (segment): the masks were written, then the CSV failed on the name."""
    name = os.fsdecode(b"caf\xe9.png")
    path = write_csv([SegmentationRecord(file=str(tmp_path / name))], tmp_path / "segmentation.csv")
    with open(path, newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["file"].endswith("caf\\udce9.png")


def test_prepare_skips_a_non_utf8_file_name_with_a_reason(tmp_path):
    """Row 16 (prepare --skip-invalid): a pyarrow traceback before; now the file is skipped and reported."""
    root = plain_data(tmp_path / "data", names=("a", "b", "c", "d"))
    bad = os.fsdecode(b"caf\xe9")
    for folder in ("images", "masks"):
        os.rename(root / folder / "d.png", root / folder / f"{bad}.png")
    dataset_dict, report = build_domain(custom_domain("mine", "dermoscopy"), root, layout="plain",
                                        cache_dir=tmp_path / "cache", skip_invalid=True, progress=False)
    assert sum(report.rows.values()) == 3
    (skipped,) = report.skipped
    assert skipped["file_name"] == "caf\\udce9.png" and "not valid UTF-8" in skipped["reason"]


def test_png_text_chunks_do_not_reach_the_dataset_unless_asked(tmp_path):
    """Row 17: a ``PatientName`` tEXt chunk was copied byte for byte into the Parquet that --push-to-hub uploads."""
    root = plain_data(tmp_path / "data", text={"PatientName": "Doe^Jane", "Comment": "MRN 12345"})
    options = {"layout": "plain", "cache_dir": tmp_path / "cache", "progress": False}
    dataset_dict, _ = build_domain(custom_domain("mine", "dermoscopy"), root, **options)
    for split in dataset_dict.values():
        for row in split.cast_column("image", split.features["image"].__class__(decode=False)):
            assert b"Doe^Jane" not in row["image"]["bytes"] and b"MRN" not in row["image"]["bytes"]
    stripped = dataset_dict["train"].with_format("numpy")[0]["image"]
    kept, _ = build_domain(custom_domain("mine", "dermoscopy"), root, keep_metadata=True,
                           **{**options, "cache_dir": tmp_path / "cache2"})
    raw = kept["train"].cast_column("image", kept["train"].features["image"].__class__(decode=False))[0]
    assert b"Doe^Jane" in raw["image"]["bytes"]
    np.testing.assert_array_equal(kept["train"].with_format("numpy")[0]["image"], stripped)  # same pixels


def test_evaluate_output_that_is_a_file_is_named(tmp_path, capsys):
    """Row 18: ``evaluate --output <file>`` said "error: 20"."""
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--output", str(target)]) == 1
    err = capsys.readouterr().err
    assert f"--output {target} is a file; expected a folder" in err and "error: 20" not in err
    assert target.read_text() == "mine"


def test_evaluate_names_a_data_folder_that_is_missing_or_a_file_before_loading_the_model(tmp_path, capsys,
                                                                                         monkeypatch):
    from esp_medsam_hf.commands import evaluate

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --data was checked")

    monkeypatch.setattr(evaluate, "load_model", never)
    (tmp_path / "model").mkdir()
    (tmp_path / "notes.yaml").write_text("mine")
    for data, what in (("nowhere", "does not exist"), ("notes.yaml", "is a file, not a folder")):
        path = tmp_path / data
        assert main(["evaluate", "--model", str(tmp_path / "model"), "--data", str(path),
                     "--output", str(tmp_path / "out")]) == 1
        assert f"dataset folder {path} {what}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and (tmp_path / "notes.yaml").read_text() == "mine"


def test_a_read_only_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Row 18: a read-only output said "error: 30" (evaluate) or gave a traceback (prepare, train, convert)."""
    import esp_medsam_hf.data.prepare as preparing

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "out" / "mine"))

    monkeypatch.setattr(preparing, "prepare_domain", read_only)
    data = plain_data(tmp_path / "data")
    assert prepare(data, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'out' / 'mine'}: Read-only file system" in err and "Traceback" not in err


def test_a_wrong_hub_token_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Row 18: ``hub publish`` with a wrong token gave a raw HfHubHTTPError traceback."""
    import esp_medsam_hf.hub.publish as publishing
    from huggingface_hub.errors import HfHubHTTPError

    def unauthorized(*args, **kwargs):
        raise HfHubHTTPError("401 Unauthorized: invalid token for http://127.0.0.1:1/api/repos/create",
                             response=Mock(headers={}))

    monkeypatch.setattr(publishing, "publish_model", unauthorized)
    folder = tmp_path / "release"
    folder.mkdir()
    assert main(["hub", "publish", "--repo", "me/model", "--stage", f"main={folder}"]) == 1
    assert "esp-medsam hub publish: error: 401 Unauthorized: invalid token" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([1.0, float("nan")]), r"tensor image_encoder.w has 1 NaN or infinite"),
    (torch.tensor([1, 2], dtype=torch.int8), r"tensor image_encoder.w is torch.int8, expected floating-point"),
], ids=["nan", "int8"])
def test_the_converter_refuses_weights_that_are_not_finite_floats(tmp_path, bad, message):
    """Row 13: NaN or int8 weights were converted and written silently."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"image_encoder.w": bad, "bn.num_batches_tracked": torch.tensor(3)}, str(path))
    with pytest.raises(ValueError, match=rf"weights\.safetensors: {message}"):
        load_checkpoint(path)


def test_convert_names_a_corrupt_safetensors_file(tmp_path, capsys):
    """Row 18: a corrupt ``.safetensors`` gave a raw SafetensorError traceback."""
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["convert", "--litemedsam", str(path), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {path} could not be read as a safetensors file" in err
    assert not (tmp_path / "out").exists()
