"""The measurement loop: build each candidate, count its FLOPs, time it per dtype and batch size, save as it goes."""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .candidates import build_candidate
from .machine import load_average, machine_info
from .report import add_ratios, write_json, write_report
from .settings import ALL_MODELS, BenchmarkSettings, Candidate, Measurement
from .timing import count_flops, time_step

logger = logging.getLogger(__name__)

Progress = Callable[[str], None] | None


def run_benchmark(
    settings: BenchmarkSettings,
    output_dir: str | os.PathLike,
    progress: Progress = None,
) -> dict[str, Any]:
    """Measure every candidate in ``settings.models``; writes ``benchmark.json`` after each measurement (so a run
    cut short keeps what it measured), then ``benchmark.md`` and ``benchmark.png``. Returns the JSON content."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(settings.models) - set(ALL_MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; expected some of {', '.join(ALL_MODELS)}")
    report: dict[str, Any] = {
        "machine": machine_info(settings.device),
        "settings": asdict(settings),
        "models": {},
        "results": [],
        "skipped": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for name in settings.models:
            if name.startswith("esp-medsam-onnx") and settings.device != "cpu":
                report["skipped"][name] = "onnxruntime runs on the CPU only in this benchmark"
                continue
            try:
                candidate = build_candidate(name, settings, Path(workdir))
            except (ImportError, FileNotFoundError) as error:
                logger.warning("skipping %s: %s", name, error)
                report["skipped"][name] = str(error)
                continue
            _describe(report, candidate, progress)
            _measure_candidate(report, candidate, settings, output_dir, progress)
            del candidate
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()
    write_report(report, output_dir)
    return report


def _describe(report: dict[str, Any], candidate: Candidate, progress: Progress) -> None:
    """The candidate's description, input size, parameters and GFLOPs per image under ``report["models"]``."""
    flops = count_flops(candidate.flops_step) if candidate.flops_step is not None else None
    report["models"][candidate.name] = {
        "description": candidate.description,
        "image_size": candidate.image_size,
        "parameters": candidate.parameters,
        "gflops_per_image": None if flops is None else flops / 1e9,
    }
    if progress:
        progress(f"{candidate.name}: {candidate.parameters / 1e6:.2f} M parameters")


def _measure_candidate(
    report: dict[str, Any], candidate: Candidate, settings: BenchmarkSettings, output_dir: Path, progress: Progress
) -> None:
    """One row per dtype (of those the candidate runs) and batch size; ``benchmark.json`` is rewritten after each."""
    for dtype in settings.dtypes:
        if dtype not in candidate.dtypes:
            continue
        for batch_size in settings.batch_sizes:
            row = _measure(candidate, settings, dtype, batch_size)
            if row is None:
                report["skipped"][f"{candidate.name} {dtype} batch {batch_size}"] = "out of memory"
                continue
            report["results"].append(asdict(row))
            add_ratios(report)
            report["machine"]["load_average_end"] = load_average()
            write_json(report, output_dir / "benchmark.json")
            if progress:
                progress(f"{candidate.name} {dtype} batch {batch_size}: {row.latency_ms:.1f} ms")


def _measure(candidate: Candidate, settings: BenchmarkSettings, dtype: str, batch_size: int) -> Measurement | None:
    """Time one step of ``candidate``; None when it runs out of memory."""
    step = candidate.make_step(batch_size, dtype)
    try:
        times, peak, cpu_times = time_step(step, settings.device, settings.warmup, settings.iterations)
    except torch.OutOfMemoryError:
        del step
        torch.cuda.empty_cache()
        logger.warning("%s %s batch %d: out of memory", candidate.name, dtype, batch_size)
        return None
    median = statistics.median(times)
    return Measurement(
        model=candidate.name,
        dtype=dtype,
        batch_size=batch_size,
        latency_ms=median * 1e3,
        latency_min_ms=min(times) * 1e3,
        images_per_s=batch_size / median,
        peak_memory_mib=None if peak is None else round(peak, 1),
        iterations=len(times),
        process_cpu_ms=None if settings.device != "cpu" else statistics.median(cpu_times) * 1e3,
    )
