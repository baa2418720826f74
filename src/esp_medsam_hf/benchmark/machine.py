"""The machine a benchmark ran on: CPU, cores, threads, load, GPU and library versions."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def dist_version(package: str) -> str | None:
    """The installed version of ``package`` (its distribution name, ``_`` read as ``-``), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the platform has them."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, cores, threads, load average, GPU name and library versions."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "timm", "onnx", "onnxruntime", "numpy", "esp_medsam_hf"):
        with contextlib.suppress(Exception):
            module = importlib.import_module(package)
            versions[package] = getattr(module, "__version__", None) or dist_version(package)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "versions": versions,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info
