#!/usr/bin/env python
"""Share of the modality classifier in ESP-MedSAM's forward time (official configuration, 1024 px).

Times, in the same run and on the same input, (a) the full forward pass with modality=None (the classifier chooses
the modality) and (b) the classifier alone on the aggregator's stage-0 features, and prints (b) / (a). Weights are
random: the cost of a forward does not depend on their values.

Example: python scripts/benchmark_modality_classifier.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel


def _timed(function, repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of each call (synchronising CUDA before reading the clock)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=1024, help="input size (default: official 1024)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes (after one warm-up)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--limit", type=float, default=0.02, help="exit code 1 if the share exceeds this")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = EspMedSamConfig(image_size=args.image_size)
    model = EspMedSamModel(config).eval().to(device=device, dtype=dtype)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    with torch.inference_mode():
        features = model.aggregator.stem(pixel_values)
        model(pixel_values)  # warm-up
        model.modality_classifier(features)
        forward = _timed(lambda: model(pixel_values), args.repeats, device)
        classifier_repeats = max(10, args.repeats * 10)
        classifier = _timed(lambda: model.modality_classifier(features), classifier_repeats, device)
    forward_s, classifier_s = statistics.median(forward), statistics.median(classifier)
    share = classifier_s / forward_s
    classifier_params = sum(p.numel() for p in model.modality_classifier.parameters())
    total_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; input {args.batch_size}x3x{args.image_size}x{args.image_size} {args.dtype}")
    print(f"forward (modality=None): median {forward_s * 1000:.1f} ms over {args.repeats} runs")
    print(f"modality classifier alone: median {classifier_s * 1000:.3f} ms over {classifier_repeats} runs")
    print(f"classifier parameters: {classifier_params:,} of {total_params:,} ({classifier_params / total_params:.2%})")
    print(f"classifier share of the forward time: {share:.4%} (ratio {share:.6f}; limit {args.limit:.2%})")
    return 0 if share <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
