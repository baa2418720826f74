"""The main job in its reduced mode: three stages, evaluation, publishing to the local Hub, reload, real images."""

import json

import pytest
import torch

from esp_medsam_hf.cli import main
from esp_medsam_hf.hub.local import LocalHubError, find_olah


def olah_available() -> bool:
    try:
        find_olah()
    except LocalHubError:
        return False
    return True


@pytest.mark.skipif(not olah_available(), reason="the local Hub needs olah (the dev extra)")
def test_quick_demo_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--quick", "--output", str(output), "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["quick"] is True
    assert set(summary["hub"]["commits"]) == {"stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam", "main"}
    assert summary["reload"]["max_abs_difference"] < 1e-5
    assert summary["reload"]["auto_model_max_abs_difference"] < 1e-5
    for stage in ("stage-1-teacher/best", "stage-2-distill/final", "stage-3-esp-medsam/release"):
        assert (output / stage / "model.safetensors").is_file(), stage
    assert (output / "stage-3-esp-medsam/release/pipeline_esp_medsam.py").is_file()  # the custom pipeline ships
    for name in ("results.md", "results.json", "dice_hd.png"):
        assert (output / "evaluation" / name).is_file()
    names = {record["name"] for record in summary["real_images"]}
    assert "dsb2018_nuclei" in names and "chest_xray_dicom" in names
    for record in summary["real_images"]:
        assert (output / "real_images" / f"{record['name']}_overlay.png").is_file()
    assert 0 <= summary["modality_classifier"]["held_out_accuracy"] <= 100
    assert "SYNTHETIC" in (output / "SUMMARY.md").read_text()
    # the hub's git repository holds one branch per stage, each with its own model card
    repo = output / "hub" / "repos" / "models" / "esp-medsam" / "esp-medsam-demo"
    assert repo.exists()
    # a second run never overwrites the first one unless asked
    capsys.readouterr()
    assert main(["demo", "--quick", "--output", str(output), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
