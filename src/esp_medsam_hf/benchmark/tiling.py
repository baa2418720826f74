"""What tiled inference costs: ``prediction.predict`` on a 1024x1024 image at native scale (16 tiles of 256 px, no
overlap, microscopy, the backend's default precision: int8 on onnxruntime, and its tile batch) against

- the same 16 tiles sent one by one through ``backends.run_inference`` in the same precision and through the same
  graph, microscopy's own (``one_modality_graph``, as tiled inference sends them; what tiling adds
  beyond its tiles' forwards; issue 19's target: at most 1.2x), and
- one whole-image 256-px float32 forward of the same model on the same backend (what a native-scale 1024-px image
  costs against the whole view; issue 25's target: at most 8x, with int8 and tile batching together), and the same
  whole-image forward in eager PyTorch (float32), the model's own forward: the 8x is read against the first, the
  stricter one (onnxruntime's float32 forward is the faster of the two); the second is reported beside it.

The three are timed interleaved, repeat after repeat, so that a shared machine's load hits all alike; the ratio of
each repeat is reported with its spread."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

MICROSCOPY = 4
"""Modality index given to every forward (the six bags' order: microscopy is the fifth)."""


def _model(tile: int, quick: bool, device: str):
    from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
    from ..models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

    torch.manual_seed(0)
    config = EspMedSamConfig.tiny(image_size=tile) if quick else EspMedSamConfig(image_size=tile)
    model = EspMedSamModel(config).eval().to(device)
    processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": tile, "width": tile}),
                                   config.modality_names)
    return model, processor


def measure_tiling(
    image_size: int = 1024, tile: int = 256, repeats: int = 5, backend: str | None = None, device: str = "cpu",
    quick: bool = False,
) -> dict[str, Any]:
    """Time ``predict(scale=1, overlap=0)`` on an ``image_size`` square image against its ``(image_size / tile)**2``
    tiles' single forwards and against one whole-image float32 forward, ``repeats`` times interleaved after one
    untimed call of each. Returns the settings, the seconds of each repeat and the ratios (median, min, max)."""
    from ..models.esp_medsam.backends import inference_batch_size, resolve_backend, resolve_int8, run_inference
    from ..models.esp_medsam.prediction import predict

    if image_size % tile:
        raise ValueError(f"image_size ({image_size}) must be a multiple of tile ({tile})")
    model, processor = _model(tile, quick, device)
    chosen = resolve_backend(model, backend)
    image = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    crops = [image[y : y + tile, x : x + tile] for y in range(0, image_size, tile) for x in range(0, image_size, tile)]
    pixels = [processor(images=[crop], return_tensors="pt")["pixel_values"].to(device) for crop in crops]
    whole = processor(images=[image], return_tensors="pt")["pixel_values"].to(device)
    modality = torch.tensor([MICROSCOPY])
    steps = {
        "tiled": lambda: predict(model, processor, [image], MICROSCOPY, backend=chosen, scale=1.0, overlap=0),
        "singles": lambda: [run_inference(model, p, modality, backend=chosen, one_modality_graph=True) for p in pixels],
        "whole_fp32": lambda: run_inference(model, whole, modality, backend=chosen, int8=False),
        "whole_eager_fp32": lambda: run_inference(model, whole, modality, backend="eager"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}  # process CPU time: steadier on a shared machine
    for step in steps.values():  # warm-up: the ONNX export and sessions, MONAI's import, allocator growth
        step()
    for repeat in range(repeats):
        for name, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            seconds[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        logger.info("repeat %d: tiled %.2f s, %d single forwards %.2f s, whole fp32 %.2f s (eager %.2f s)",
                    repeat + 1, seconds["tiled"][-1], len(crops), seconds["singles"][-1], seconds["whole_fp32"][-1],
                    seconds["whole_eager_fp32"][-1])
    ratios = [a / b for a, b in zip(seconds["tiled"], seconds["singles"])]
    to_whole = [a / b for a, b in zip(seconds["tiled"], seconds["whole_fp32"])]
    to_eager = [a / b for a, b in zip(seconds["tiled"], seconds["whole_eager_fp32"])]
    return {
        "image_size": image_size, "tile": tile, "tiles": len(crops), "repeats": repeats, "backend": chosen,
        "int8": chosen == "onnxruntime" and resolve_int8(None, ["microscopy"]), "device": device, "quick": quick,
        "tile_batch_size": inference_batch_size(device, backend=chosen), "threads": torch.get_num_threads(),
        "tiled_seconds": seconds["tiled"], "singles_seconds": seconds["singles"],
        "whole_fp32_seconds": seconds["whole_fp32"], "whole_eager_fp32_seconds": seconds["whole_eager_fp32"],
        "ratios": ratios, "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios_to_whole": to_whole,
        "ratio_to_whole_median": statistics.median(to_whole), "ratio_to_whole_min": min(to_whole),
        "ratio_to_whole_max": max(to_whole), "ratios_to_eager_whole": to_eager,
        "ratio_to_eager_whole_median": statistics.median(to_eager),
        "cpu_seconds": cpu, "cpu_ratio_to_whole_median": statistics.median(
            a / b for a, b in zip(cpu["tiled"], cpu["whole_fp32"])),
    }


def tiling_markdown(result: dict[str, Any]) -> str:
    """The measurement as a short Markdown table."""
    precision = "int8" if result.get("int8") else "float32"
    cpu = result["cpu_seconds"]
    return "\n".join([
        f"Tiled inference of a {result['image_size']}x{result['image_size']} image at native scale "
        f"({result['tiles']} tiles of {result['tile']} px, no overlap, {result['tile_batch_size']} tiles per "
        f"forward, {precision}) against its {result['tiles']} tiles' single forwards ({precision}) and one "
        f"whole-image {result['tile']}-px float32 forward; backend {result['backend']}, {result['device']}, "
        f"{result['threads']} threads, {result['repeats']} interleaved repeats"
        f"{' (quick: tiny model)' if result['quick'] else ''}.",
        "",
        "| | median s | min s | max s |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
          for name, values in (("predict, tiled", result["tiled_seconds"]),
                               (f"{result['tiles']} single forwards", result["singles_seconds"]),
                               (f"one whole-image float32 forward ({result['backend']})",
                                result["whole_fp32_seconds"]),
                               ("one whole-image float32 forward (eager PyTorch)",
                                result["whole_eager_fp32_seconds"]))),
        "",
        f"Ratio tiled / single forwards: median {result['ratio_median']:.3f} (per repeat {result['ratio_min']:.3f} "
        f"to {result['ratio_max']:.3f}); target at most 1.2.",
        f"Ratio tiled / one whole-image float32 forward: median {result['ratio_to_whole_median']:.2f} (per repeat "
        f"{result['ratio_to_whole_min']:.2f} to {result['ratio_to_whole_max']:.2f}) on {result['backend']}, the "
        f"baseline of the target (at most 8); against eager PyTorch's float32 forward: median "
        f"{result['ratio_to_eager_whole_median']:.2f}.",
        f"In process CPU time (all threads; steadier on a shared machine): tiled {statistics.median(cpu['tiled']):.2f} "
        f"s, whole float32 {statistics.median(cpu['whole_fp32']):.2f} s, ratio median "
        f"{result['cpu_ratio_to_whole_median']:.2f}.",
        "",
    ])


__all__ = ["measure_tiling", "tiling_markdown"]
