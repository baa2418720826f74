"""The cost of a prompt on a cached image embedding against a full forward, measured in one run on one model.

An interactive session encodes the image once (``get_image_embeddings``) and decodes every click or box from the
cached embedding (``model(image_embeddings=..., input_points=...)``); the issue's target is a prompt costing at most
10 % of a full prompt-free forward on a CPU.
"""

from __future__ import annotations

import statistics

import torch

from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from .machine import machine_info
from .timing import time_step


def measure_prompt_cost(
    image_size: int = 1024, iterations: int = 5, warmup: int = 1, device: str = "cpu", tiny: bool = False
) -> dict:
    """Median latency (ms) of a full forward (one image) and of one prompt (a box and two clicks, one object) on its
    cached embedding, for the official-size model (random weights, eval mode, fp32; ``tiny``: the tiny test
    configuration), and their ratio."""
    torch.manual_seed(0)
    config = EspMedSamConfig.tiny(image_size=image_size) if tiny else EspMedSamConfig(image_size=image_size)
    model = EspMedSamModel(config).eval().to(device)
    pixel_values = torch.randn(1, 3, image_size, image_size, device=device)
    modality = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixel_values, modality)
    size = float(image_size)
    prompts = dict(
        input_boxes=torch.tensor([[[0.2 * size, 0.2 * size, 0.7 * size, 0.8 * size]]], device=device),
        input_points=torch.tensor([[[[0.4 * size, 0.5 * size], [0.6 * size, 0.3 * size]]]], device=device),
        input_labels=torch.tensor([[[1, 0]]], device=device),
    )
    steps = {
        "full_forward": lambda: model(pixel_values, modality=modality),
        "prompt_on_cached_embedding": lambda: model(image_embeddings=embeddings, modality=modality, **prompts),
    }
    latency = {}
    for name, step in steps.items():
        times, _, _ = time_step(step, device, warmup, iterations)
        latency[name] = statistics.median(times) * 1e3
    return {
        "machine": machine_info(device),
        "image_size": image_size,
        "iterations": iterations,
        "threads": torch.get_num_threads(),
        "latency_ms": latency,
        "ratio": latency["prompt_on_cached_embedding"] / latency["full_forward"],
    }
