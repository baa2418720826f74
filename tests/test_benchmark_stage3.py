"""scripts/benchmark_stage3.py in its quick mode (demo's quick sizes, the tiny model): the baseline setting really
trains in float32 with Adam's per-parameter implementation and today's with the fused one, the timings are read
from the runs, and the report holds both settings and their ratios. Nothing timed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from esp_medsam_hf.data.real import MNFINDER_ARCHIVE, VASCX_ARCHIVE
from _script_helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "benchmark_stage3.py"
pytestmark = pytest.mark.skipif(not (MNFINDER_ARCHIVE.path().is_file() and VASCX_ARCHIVE.path().is_file()),
                                reason="the real-data archives are fetched by scripts/install.sh")


def test_each_setting_reaches_the_optimizer_and_the_precision(tmp_path, monkeypatch):
    benchmark = load_script("benchmark_stage3")
    made: list[dict] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    for setting in ("before", "after"):
        result = benchmark.run_setting(setting, tmp_path / setting, steps=3, init_from=None, quick=True)
        assert result["encoding_s"] > 0 and result["step_s_median"] > 0 and result["steps_timed"] == 2
        config = yaml.safe_load((tmp_path / setting / "stage-3-esp-medsam" / "config.yaml").read_text())
        assert {key: config[key] for key in benchmark.SETTINGS[setting]} == benchmark.SETTINGS[setting]
    assert [kwargs["fused"] for kwargs in made] == [None, True]


def test_report_holds_both_settings_and_refuses_an_existing_folder(tmp_path):
    output = tmp_path / "speed"
    subprocess.run([sys.executable, str(SCRIPT), "--output", str(output), "--quick", "--steps", "3", "--repeats", "1"],
                   check=True, capture_output=True, text=True)
    report = json.loads((output / "stage3_speed.json").read_text())
    assert [(run["setting"], run["fused_optimizer"]) for run in report["runs"]] == [("before", False), ("after", True)]
    assert len(report["encoding_ratio"]) == len(report["step_ratio"]) == 1
    assert report["step_ratio"][0] == pytest.approx(report["runs"][1]["step_s_median"] / report["runs"][0]["step_s_median"])
    again = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output), "--quick"], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
