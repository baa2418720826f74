"""No command deletes or replaces what it did not create (issue 13): ``--overwrite`` refuses an output folder that
holds the inputs or unrelated files, a refused run leaves no marks, prepare keeps a user's README.md, segment does
not re-segment its own outputs, killed runs leave no cache forever, atomic writes honour the umask."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.cli import main
from esp_medsam_hf.data.layouts import LayoutError
from esp_medsam_hf.data.prepare import prepare_domain, write_output
from esp_medsam_hf.data.prepared import prepared_domains
from esp_medsam_hf.data.synthetic import synthetic_domain
from esp_medsam_hf.models.esp_medsam.fileio import atomic_file, check_replaceable, staging_directory
from esp_medsam_hf.inference import collect_inputs
from esp_medsam_hf.training import EspMedSamStageConfig
from esp_medsam_hf.training.run_folder import prepare_output_dir


def tree(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    EspMedSamModel(EspMedSamConfig.tiny(image_size=64)).save_pretrained(folder)
    return folder


def evaluate(model, output, *extra):
    return main(["evaluate", "--model", str(model), "--output", str(output), "--domains", "isic",
                 "--num-per-split", "1", "--no-hausdorff", "--device", "cpu", *extra])


def test_evaluate_overwrite_refuses_the_model_folder(model_dir, capsys):
    before = tree(model_dir)
    assert evaluate(model_dir, model_dir, "--overwrite") == 1
    assert "is the input" in capsys.readouterr().err
    assert tree(model_dir) == before


def test_evaluate_overwrite_refuses_unrelated_files_but_replaces_its_own(model_dir, tmp_path, capsys):
    output = tmp_path / "report"
    output.mkdir()
    (output / "thesis.docx").write_bytes(b"years of work")
    assert evaluate(model_dir, output, "--overwrite") == 1
    assert "does not write (thesis.docx)" in capsys.readouterr().err
    (output / "thesis.docx").unlink()
    assert evaluate(model_dir, output) == 0
    assert evaluate(model_dir, output, "--overwrite") == 0  # a folder of its own outputs is replaced
    assert {p.name for p in output.iterdir()} <= {"results.md", "results.json", "dice_hd.png", "cases"}


def test_convert_overwrite_refuses_a_folder_holding_the_checkpoint_or_other_files(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    checkpoint = output / "esp_medsam.pth"
    checkpoint.write_bytes(b"weights")
    (output / "notes.txt").write_text("mine")
    before = tree(output)
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(output), "--overwrite"]) == 1
    assert "holds the input" in capsys.readouterr().err
    assert main(["convert", "--checkpoint", str(tmp_path / "elsewhere.pth"), "--output", str(output),
                 "--overwrite"]) == 1
    assert "does not write (esp_medsam.pth, notes.txt)" in capsys.readouterr().err
    assert tree(output) == before


def test_check_replaceable_accepts_a_model_folder_of_its_own(model_dir):
    check_replaceable(model_dir, owned=("*.json", "*.safetensors", "*.py", "*.md"), inputs=["elsewhere"])


def test_train_overwrite_refuses_to_delete_its_own_init_from(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_bytes(b"previous model")
    config = EspMedSamStageConfig(output_dir=str(run), overwrite=True, init_from=str(run / "final"),
                                  model_size="tiny", image_size=64)
    with pytest.raises(FileExistsError, match="would delete .*final, which holds init_from"):
        prepare_output_dir(config, run)
    assert (run / "final" / "model.safetensors").read_bytes() == b"previous model"


def test_prepare_keeps_a_users_readme_and_a_refused_run_leaves_no_marks(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "README.md").write_text("# My project\n")
    data = synthetic_domain("isic", 1, seed=0, size=32)
    with pytest.raises(FileExistsError, match="README.md is not a dataset card"):
        write_output(data, output, "isic", synthetic=True)
    assert sorted(p.name for p in output.iterdir()) == ["README.md"]
    assert (output / "README.md").read_text() == "# My project\n"

    (output / "README.md").unlink()
    write_output(data, output, "isic")  # a real-data folder (the data itself does not matter here)
    card = (output / "README.md").read_text()
    with pytest.raises(FileExistsError, match="already exists"):
        write_output(data, output, "isic", synthetic=True)  # refused: no --overwrite
    assert not (output / ".synthetic").exists()
    assert (output / "README.md").read_text() == card and "SYNTHETIC" not in card
    assert prepared_domains(output) == ["isic"]


def test_prepare_removes_caches_of_killed_runs(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = output / f".cache-{dead.pid}-abcd"
    (stale / "build-1").mkdir(parents=True)
    (stale / "build-1" / "big.arrow").write_bytes(b"0" * 1000)
    alive = output / f".cache-{os.getppid()}-efgh"  # a running process's cache is left alone
    alive.mkdir()
    with pytest.raises(LayoutError, match="not a folder"):  # the data is missing; the clean-up came first
        prepare_domain("isic", tmp_path / "no-data", output)
    assert not stale.exists() and alive.exists()
    assert not [p for p in output.iterdir() if p.name.startswith(f".cache-{os.getpid()}")]


def test_segment_does_not_collect_its_own_outputs(tmp_path):
    inputs = tmp_path / "images"
    (inputs / "results").mkdir(parents=True)
    (inputs / "a.png").write_bytes(b"")
    (inputs / "results" / "a_mask.png").write_bytes(b"")
    (inputs / "results" / "a_overlay.png").write_bytes(b"")
    assert [item.path.name for item in collect_inputs([inputs])] == ["a.png", "a_mask.png", "a_overlay.png"]
    assert [item.path.name for item in collect_inputs([inputs], exclude=inputs / "results")] == ["a.png"]


def test_atomic_writes_get_normal_permissions_under_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "report.json") as temporary:
            temporary.write_text("{}")
        with staging_directory(tmp_path / "folder") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
