#!/usr/bin/env python
"""Where the encoder's full-resolution stem spends its time on this CPU: the frozen prefix that stage 3 caches
(stem, modality-classifier pooling, TinyViT stages 1-2; at 256 px the official stem keeps all 256x256 pixels at 64
and 256 channels), profiled with ``torch.profiler`` in float32 and under the training's bf16 autocast, beside a
memory probe: copying, GELU and ReLU of one stem-sized activation. When GELU runs no faster than a plain copy of
the same tensor, the stem is bound by memory bandwidth, which is what slow machines lack most. Last, the stem run
whole against the same stem run in bands of rows (each with the rows its 3x3 depthwise convolutions reach beyond
it), whose activations stay in cache: the output is the same, the time is what a banded stem would save.

Examples:
    python scripts/profile_encoding.py                      # the main job's architecture (256 px), batch 2
    python scripts/profile_encoding.py --architecture official --batch-size 1   # 1024 px, the same stem grid
    python scripts/profile_encoding.py --architecture tiny --batch-size 2 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.benchmark.timing import time_step
from esp_medsam_hf.conversion import litemedsam_config
from esp_medsam_hf.training.features import encode

CACHE_POINT = 3
"""The main job's ``frozen_encoder_stages``: the stem and TinyViT stages 1-2."""
ARCHITECTURES = {
    "main-job": litemedsam_config,  # 256 px, 1x1 stride-1 patch embedding: the stem keeps all 256x256 pixels
    "official": EspMedSamConfig,  # 1024 px, two stride-2 convolutions: the same 256x256 stem grid
    "tiny": lambda: EspMedSamConfig.tiny(image_size=64),
}


def seconds(call, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``call`` after one warm-up call (``benchmark.timing.time_step``)."""
    return statistics.median(time_step(call, "cpu", warmup=1, iterations=repeats)[0])


def operator_shares(model: EspMedSamModel, pixels: torch.Tensor, bf16: bool, top: int) -> list[tuple[str, float]]:
    """The ``top`` operators by self CPU time in one encoding, as (name, share of the total in %)."""
    modality = torch.zeros(pixels.shape[0], dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        encode(model, pixels, modality, CACHE_POINT)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            encode(model, pixels, modality, CACHE_POINT)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, 100.0 * e.self_cpu_time_total / total) for e in ranked]


def memory_probe(shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Milliseconds to copy, GELU and ReLU one tensor of ``shape``, and the copy's traffic in GB/s."""
    values = torch.randn(shape).to(dtype)
    copy = seconds(values.clone, repeats)
    return {"copy_ms": 1e3 * copy, "gelu_ms": 1e3 * seconds(lambda: F.gelu(values), repeats),
            "relu_ms": 1e3 * seconds(lambda: F.relu(values), repeats),
            "copy_gb_per_s": 2 * values.numel() * values.element_size() / copy / 1e9}


def banded_stem(model: EspMedSamModel, pixels: torch.Tensor, band: int) -> torch.Tensor:
    """The stem's output computed ``band`` rows at a time: each band runs with the rows stage 0's 3x3 depthwise
    convolutions (one per MBConv) reach beyond it, which are cut off afterwards; a 1x1 stride-1 patch embedding
    (the main job's architecture) reaches no further, so the result equals the whole stem's."""
    aggregator = model.aggregator
    if (model.config.aggregator_config.patch_embed_kernel_size, model.config.aggregator_config.patch_embed_stride) \
            != (1, 1):
        raise ValueError("banded_stem needs a 1x1 stride-1 patch embedding (the main-job architecture)")
    reach = model.config.aggregator_config.depths[0]
    height = pixels.shape[-2]
    rows = []
    for top in range(0, height, band):
        low, high = max(0, top - reach), min(height, top + band + reach)
        rows.append(aggregator.stem(pixels[..., low:high, :])[..., top - low : top - low + min(band, height - top), :])
    return torch.cat(rows, dim=-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="main-job")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4, help="timed encodings per setting (median)")
    parser.add_argument("--top", type=int, default=6, help="operators listed per setting")
    args = parser.parse_args()
    if min(args.batch_size, args.repeats, args.top) < 1:
        parser.error("--batch-size, --repeats and --top must be >= 1")
    config = ARCHITECTURES[args.architecture]()
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().optimize_for_inference()
    pixels = torch.randn(args.batch_size, 3, config.image_size, config.image_size)
    modality = torch.zeros(args.batch_size, dtype=torch.long)
    with torch.no_grad():
        stem = model.aggregator.stem(pixels)
    expanded = (args.batch_size, stem.shape[1] * 4, *stem.shape[2:])  # an MBConv's expanded activation
    print(f"{args.architecture} architecture, {config.image_size} px, batch {args.batch_size}, encoder prefix up to "
          f"stage {CACHE_POINT - 1}, {torch.get_num_threads()} threads; stem output {tuple(stem.shape)}")
    print("\n| setting | ms per image | top operators (share of self CPU time) |\n| --- | ---: | --- |")
    for name, bf16 in (("float32", False), ("bf16 autocast", True)):
        def run(bf16: bool = bf16) -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                encode(model, pixels, modality, CACHE_POINT)

        per_image = 1e3 * seconds(run, args.repeats) / args.batch_size
        shares = ", ".join(f"{op[6:]} {share:.0f} %" for op, share in operator_shares(model, pixels, bf16, args.top))
        print(f"| {name} | {per_image:.0f} | {shares} |")
    print(f"\nOne activation of {expanded} (an MBConv's expanded stem features):\n")
    print("| dtype | copy (ms) | GELU (ms) | ReLU (ms) | copy traffic (GB/s) |\n| --- | ---: | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.bfloat16):
        probe = memory_probe(expanded, dtype, args.repeats)
        print(f"| {str(dtype)[6:]} | {probe['copy_ms']:.1f} | {probe['gelu_ms']:.1f} | {probe['relu_ms']:.1f} | "
              f"{probe['copy_gb_per_s']:.1f} |")
    if args.architecture == "main-job":
        print("\n| stem | float32 (ms per batch) | bf16 autocast (ms per batch) | max difference to whole |\n"
              "| --- | ---: | ---: | ---: |")
        with torch.no_grad():
            whole = model.aggregator.stem(pixels)
            for band in (None, 16, 32):
                def run(bf16: bool, band: int | None = band) -> None:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        model.aggregator.stem(pixels) if band is None else banded_stem(model, pixels, band)

                difference = 0.0 if band is None else (banded_stem(model, pixels, band) - whole).abs().max().item()
                print(f"| {'whole' if band is None else f'{band}-row bands'} | "
                      f"{1e3 * seconds(lambda: run(False), args.repeats):.0f} | "
                      f"{1e3 * seconds(lambda: run(True), args.repeats):.0f} | {difference:.1e} |")
    with contextlib.suppress(BrokenPipeError):
        print()


if __name__ == "__main__":
    main()
