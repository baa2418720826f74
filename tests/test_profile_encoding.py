"""scripts/profile_encoding.py: the architectures it names have the stems the docs say, the memory probe times
what it says, the operator shares come from a real profile, and the command prints both settings' rows. Nothing
timed is asserted beyond being positive."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from _script_helpers import SCRIPTS, load_script

SCRIPT = SCRIPTS / "profile_encoding.py"


def test_the_main_job_and_official_architectures_keep_a_256_pixel_stem_grid():
    profile = load_script("profile_encoding")
    for name in ("main-job", "official"):
        config = profile.ARCHITECTURES[name]()
        aggregator = config.aggregator_config
        stride = aggregator.patch_embed_stride ** 2  # the patch embedding's two convolutions
        assert config.image_size // stride == 256, name


def test_operator_shares_come_from_a_profile_of_the_encoding():
    profile = load_script("profile_encoding")
    model = profile.EspMedSamModel(profile.ARCHITECTURES["tiny"]()).eval()
    shares = profile.operator_shares(model, torch.randn(2, 3, 64, 64), bf16=False, top=4)
    assert len(shares) == 4 and all(name.startswith("aten::") for name, _ in shares)
    assert [share for _, share in shares] == sorted((share for _, share in shares), reverse=True)
    assert 0 < sum(share for _, share in shares) <= 100 + 1e-6
    assert "aten::mkldnn_convolution" in dict(profile.operator_shares(model, torch.randn(2, 3, 64, 64), False, 50))


def test_memory_probe_reports_positive_times_and_the_copy_traffic():
    probe = load_script("profile_encoding").memory_probe((2, 8, 32, 32), torch.float32, repeats=1)
    assert set(probe) == {"copy_ms", "gelu_ms", "relu_ms", "copy_gb_per_s"}
    assert all(value > 0 for value in probe.values())


def test_the_command_prints_both_settings_and_the_probe():
    result = subprocess.run([sys.executable, str(SCRIPT), "--architecture", "tiny", "--repeats", "1", "--top", "3"],
                            capture_output=True, text=True, timeout=300, check=True)
    settings, probe = result.stdout.split("One activation of")
    assert settings.startswith("tiny architecture, 64 px, batch 2")

    def rows(table: str) -> dict[str, str]:
        return {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}

    assert rows(settings)["float32"].count("%") == 3 and rows(settings)["bf16 autocast"].count("%") == 3
    assert {"float32", "bfloat16"} <= set(rows(probe)) and rows(probe)["bfloat16"].count("|") == 6


def test_bad_counts_are_refused_naming_the_options():
    result = subprocess.run([sys.executable, str(SCRIPT), "--architecture", "tiny", "--repeats", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--repeats" in result.stderr


def test_a_banded_stem_equals_the_whole_stem_and_needs_a_pointwise_patch_embedding():
    profile = load_script("profile_encoding")
    torch.manual_seed(0)
    model = profile.EspMedSamModel(profile.ARCHITECTURES["main-job"]()).eval()
    pixels = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        whole = model.aggregator.stem(pixels)
        for band in (1, 7, 16, 40):
            torch.testing.assert_close(profile.banded_stem(model, pixels, band), whole, rtol=0, atol=1e-5)
    official = profile.EspMedSamModel(profile.ARCHITECTURES["tiny"]()).eval()
    with pytest.raises(ValueError, match="1x1 stride-1"):
        profile.banded_stem(official, torch.randn(1, 3, 64, 64), 16)
