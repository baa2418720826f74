"""What a benchmark run measures: the model names, the settings, a candidate model and one measurement."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ALL_MODELS = (
    "esp-medsam-fast",
    "esp-medsam-plain",
    "litemedsam",
    "sam-vit-b",
    "sam-vit-h",
    "esp-medsam-onnx",
    "esp-medsam-onnx-int8",
    "esp-medsam-user",
    "esp-medsam-user-microscopy",
)
BASELINE = "esp-medsam-plain"


@dataclass
class Candidate:
    """A model to time: ``make_step(batch_size, dtype)`` returns a zero-argument callable doing one forward."""

    name: str
    description: str
    image_size: int
    parameters: int
    make_step: Callable[[int, str], Callable[[], Any]]  # (batch_size, dtype name) -> step
    flops_step: Callable[[], Any] | None = None  # one fp32 batch-1 forward under eager PyTorch, for FLOP counting
    dtypes: tuple[str, ...] = ("fp32", "bf16")


@dataclass
class Measurement:
    """One timed row: a model at one dtype and batch size."""

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
    """Device, batch sizes, dtypes, models and the options of the fast and user-path configurations."""

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
