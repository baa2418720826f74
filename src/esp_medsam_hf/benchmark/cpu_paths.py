"""The CPU paths in one run (issue 25): the official release's PyTorch forward (``esp-medsam-plain``, the baseline),
our PyTorch forward, ONNX float32, ONNX int8 and the path users take, at batch 1; tiled inference of a 1024-px
image at native scale against one whole-image float32 forward (``benchmark.tiling``). The command adds, given a
trained model, int8 against float32 on the real test sets (``data.int8_accuracy``, a layer above this one: it reads
prepared data), and :func:`write_summary` sets each figure beside its target in ``cpu_paths.md``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.esp_medsam.fileio import atomic_file
from .settings import BASELINE, BenchmarkSettings

USER_ROWS = {"esp-medsam-user": "dermoscopy", "esp-medsam-user-microscopy": "microscopy"}
"""The path users take, by the modality of its images: float32 by default (dermoscopy, as every modality outside
``backends.INT8_MODALITIES``) and int8 by default (microscopy)."""
MODELS = ("esp-medsam-plain", "esp-medsam-fast", "esp-medsam-onnx", "esp-medsam-onnx-int8", *USER_ROWS)
"""The rows: the baseline first, then ours from plain PyTorch to the path users take."""
USER_PATH_TARGET = 0.4
"""Largest latency of the path users take, batch 1 at 1024 px, as a share of the official release's."""
TILED_TARGET = 8.0
"""Largest cost of a 1024-px image tiled at native scale, in whole-image 256-px float32 forwards."""
OUTPUTS = ("benchmark.json", "benchmark.md", "benchmark.png", "tiling.json", "tiling.md", "int8_accuracy.json",
           "int8_accuracy.md", "cpu_paths.json", "cpu_paths.md")
"""The files a run writes into its output folder (replaced only with ``overwrite``)."""


def check_output(output: str | os.PathLike, names: tuple[str, ...], overwrite: bool) -> Path:
    """``output`` as a Path; ``FileExistsError`` naming the first of ``names`` it already holds, unless
    ``overwrite``."""
    output = Path(output)
    existing = [name for name in names if (output / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{output / existing[0]} already exists; pass --overwrite to replace this run's files")
    return output


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as temporary:
        Path(temporary).write_text(text)


def run_cpu_paths(
    settings: BenchmarkSettings, output: str | os.PathLike, *, repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The latency rows (``benchmark.json``/``.md``/``.png``) and the tiling measurement (``tiling.json``/``.md``),
    written into ``output`` as they come; returns (report, tiling)."""
    from .runner import run_benchmark
    from .tiling import measure_tiling, tiling_markdown

    output = Path(output)
    report = run_benchmark(settings, output, progress)
    size, tile = (128, 64) if settings.quick else (1024, 256)
    if progress:
        progress("tiling")
    tiling = measure_tiling(size, tile, repeats=repeats, backend=settings.backend, device=settings.device,
                            quick=settings.quick)
    _write(output / "tiling.json", json.dumps(tiling, indent=2) + "\n")
    _write(output / "tiling.md", tiling_markdown(tiling))
    return report, tiling


def write_summary(output: str | os.PathLike, report: dict[str, Any], tiling: dict[str, Any],
                  accuracy: dict[str, Any] | None = None, accuracy_markdown: str = "") -> dict[str, Any]:
    """``cpu_paths.json`` (:func:`summarize`) and ``cpu_paths.md`` in ``output``; ``accuracy`` and its Markdown
    come from ``data.int8_accuracy`` (``None``: not measured). Returns the summary."""
    summary = summarize(report, tiling, accuracy)
    _write(Path(output) / "cpu_paths.json", json.dumps(summary, indent=2) + "\n")
    _write(Path(output) / "cpu_paths.md", cpu_paths_markdown(summary, report, tiling, accuracy_markdown))
    return summary


def summarize(report: dict[str, Any], tiling: dict[str, Any], accuracy: dict[str, Any] | None) -> dict[str, Any]:
    """Each figure of the issue beside its target: batch-1 latency ratios to the baseline, the tiled ratio, and
    whether int8 holds on every real set (``None`` where not measured)."""
    rows = {row["model"]: row for row in report["results"] if row["batch_size"] == 1 and row["dtype"] == "fp32"}
    ratios = {name: row["ratio_to_plain"] for name, row in rows.items()}
    users = {modality: ratios[name] for name, modality in USER_ROWS.items() if ratios.get(name) is not None}
    return {
        "latency_ms": {name: row["latency_ms"] for name, row in rows.items()},
        "process_cpu_ms": {name: row.get("process_cpu_ms") for name, row in rows.items()},
        "ratio_to_official": ratios,
        "user_path_ratio": users,
        "user_path_target": USER_PATH_TARGET,
        "user_path_met": {modality: ratio <= USER_PATH_TARGET for modality, ratio in users.items()},
        "tiled_to_whole_ratio": tiling["ratio_to_whole_median"],
        "tiled_target": TILED_TARGET,
        "tiled_met": tiling["ratio_to_whole_median"] <= TILED_TARGET,
        "tiled_to_eager_whole_ratio": tiling.get("ratio_to_eager_whole_median"),
        "tiled_to_whole_cpu_ratio": tiling.get("cpu_ratio_to_whole_median"),
        "int8_met": None if accuracy is None else accuracy["default_met"],
        "int8_met_every_set_forced": None if accuracy is None else accuracy["all_met"],
        "load_average": [report["machine"].get("load_average"), report["machine"].get("load_average_end")],
    }


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**NOT met**")


def cpu_paths_markdown(summary: dict[str, Any], report: dict[str, Any], tiling: dict[str, Any],
                       accuracy_markdown: str = "") -> str:
    """The run as Markdown: the targets first, then the latency table, the tiling and the int8 tables."""
    from .report import format_table
    from .tiling import tiling_markdown

    lines = [
        f"Ratios to `{BASELINE}` (the official release's PyTorch forward, measured in the same run), batch 1:",
        "",
        "| row | latency (ms) | process CPU (ms) | latency / official |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ratio in summary["ratio_to_official"].items():
        cpu = summary["process_cpu_ms"][name]
        lines.append(f"| {name} | {summary['latency_ms'][name]:.0f} | {'' if cpu is None else f'{cpu:.0f}'} "
                     f"| {'' if ratio is None else f'{ratio:.2f}'} |")
    lines.append("")
    for modality, ratio in summary["user_path_ratio"].items():
        lines.append(f"- Path users take, batch 1, {modality} images: {ratio:.2f}x the official release "
                     f"(target <= {USER_PATH_TARGET}): {_verdict(summary['user_path_met'][modality])}.")
    lines += [
        f"- Tiled {tiling['image_size']}-px image at native scale: {summary['tiled_to_whole_ratio']:.2f}x one "
        f"whole-image {tiling['tile']}-px float32 forward on {tiling['backend']} (target <= {TILED_TARGET:g}): "
        f"{_verdict(summary['tiled_met'])}; {summary['tiled_to_whole_cpu_ratio']:.2f}x in process CPU time, "
        f"{summary['tiled_to_eager_whole_ratio']:.2f}x eager PyTorch's float32 forward.",
        f"- int8 against float32 on the real test sets where int8 is the default: {_verdict(summary['int8_met'])}; "
        f"on every set with int8 forced: {_verdict(summary['int8_met_every_set_forced'])}.",
        "",
        format_table(report),
        tiling_markdown(tiling),
    ]
    if accuracy_markdown:
        lines.append(accuracy_markdown)
    return "\n".join(lines)


__all__ = ["MODELS", "OUTPUTS", "TILED_TARGET", "USER_PATH_TARGET", "USER_ROWS", "check_output",
           "cpu_paths_markdown", "run_cpu_paths", "summarize", "write_summary"]
