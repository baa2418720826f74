"""What tiled inference costs beyond its tiles' own forwards: ``prediction.predict`` on a 1024x1024 image at native
scale (16 tiles of 256 px, no overlap) against the same 16 tiles sent one by one through
``backends.run_inference``. The two are timed interleaved, repeat after repeat, so that a shared machine's load
hits both alike; the ratio of each repeat is reported with its spread."""

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
    tiles' single forwards, ``repeats`` times interleaved after one untimed call of each. Returns the settings,
    the seconds of each repeat and the ratios (median, min, max)."""
    from ..models.esp_medsam.backends import inference_batch_size, resolve_backend, run_inference
    from ..models.esp_medsam.prediction import predict

    if image_size % tile:
        raise ValueError(f"image_size ({image_size}) must be a multiple of tile ({tile})")
    model, processor = _model(tile, quick, device)
    chosen = resolve_backend(model, backend)
    image = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    crops = [image[y : y + tile, x : x + tile] for y in range(0, image_size, tile) for x in range(0, image_size, tile)]
    pixels = [processor(images=[crop], return_tensors="pt")["pixel_values"].to(device) for crop in crops]
    modality = torch.tensor([MICROSCOPY])

    def tiled() -> None:
        predict(model, processor, [image], MICROSCOPY, backend=chosen, scale=1.0, overlap=0)

    def singles() -> None:
        for tile_pixels in pixels:
            run_inference(model, tile_pixels, modality, backend=chosen)

    def seconds(step) -> float:
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    tiled(), singles()  # warm-up: the ONNX export and session, MONAI's import, allocator growth
    tiled_s, singles_s = [], []
    for repeat in range(repeats):
        tiled_s.append(seconds(tiled))
        singles_s.append(seconds(singles))
        logger.info("repeat %d: tiled %.2f s, %d single forwards %.2f s", repeat + 1, tiled_s[-1], len(crops),
                    singles_s[-1])
    ratios = [a / b for a, b in zip(tiled_s, singles_s)]
    return {
        "image_size": image_size, "tile": tile, "tiles": len(crops), "repeats": repeats, "backend": chosen,
        "device": device, "quick": quick, "tile_batch_size": inference_batch_size(device),
        "threads": torch.get_num_threads(), "tiled_seconds": tiled_s, "singles_seconds": singles_s,
        "ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def tiling_markdown(result: dict[str, Any]) -> str:
    """The measurement as a short Markdown table."""
    return "\n".join([
        f"Tiled inference of a {result['image_size']}x{result['image_size']} image at native scale "
        f"({result['tiles']} tiles of {result['tile']} px, no overlap, {result['tile_batch_size']} tiles per "
        f"forward) against its {result['tiles']} tiles' single forwards; backend {result['backend']}, "
        f"{result['device']}, {result['threads']} threads, {result['repeats']} interleaved repeats"
        f"{' (quick: tiny model)' if result['quick'] else ''}.",
        "",
        "| | median s | min s | max s |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |"
          for name, values in (("predict, tiled", result["tiled_seconds"]),
                               (f"{result['tiles']} single forwards", result["singles_seconds"]))),
        "",
        f"Ratio tiled / single forwards: median {result['ratio_median']:.3f} (per repeat {result['ratio_min']:.3f} "
        f"to {result['ratio_max']:.3f}); target at most 1.2.",
        "",
    ])


__all__ = ["measure_tiling", "tiling_markdown"]
