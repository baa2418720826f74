#!/usr/bin/env python
"""Kernels, time and bytes allocated of one ESP-MedSAM forward on the CPU (``torch.profiler``): the batch of one
modality through the bag's own weights (the path of every single-modality batch) against the same batch through
the per-image gathered weights (the path of mixed batches, and of every batch before the shared path existed).

Examples:
    python scripts/profile_forward.py                       # official architecture at 1024 px, batch 1
    python scripts/profile_forward.py --tiny --image-size 64 --batch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from esp_medsam_hf import EspMedSamConfig, EspMedSamModel
from esp_medsam_hf.models.esp_medsam import modeling_esp_medsam as modeling


def profile_forward(model: EspMedSamModel, pixels: torch.Tensor, modality: torch.Tensor, gathered: bool) -> dict:
    """Operator calls, self CPU time and bytes allocated by operators of one forward."""
    original = modeling.single_modality
    patched = (lambda _: None) if gathered else original
    with torch.no_grad():
        modeling.single_modality = patched
        try:
            model(pixels, modality=modality)  # warm-up
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                outputs = model(pixels, modality=modality)
        finally:
            modeling.single_modality = original
    events = prof.key_averages()
    counts = Counter({e.key: e.count for e in events if e.key.startswith("aten::")})
    return {
        "outputs": outputs,
        "aten_calls": sum(counts.values()),
        "counts": counts,
        "self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
        "allocated_mib": sum(max(e.self_cpu_memory_usage, 0) for e in events) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="EspMedSamConfig.tiny() instead of the official one")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = (EspMedSamConfig.tiny if args.tiny else EspMedSamConfig)(image_size=args.image_size)
    torch.manual_seed(0)
    model = EspMedSamModel(config).eval().fuse_batchnorm()
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    modality = torch.full((args.batch_size,), 2)
    before = profile_forward(model, pixels, modality, gathered=True)
    after = profile_forward(model, pixels, modality, gathered=False)
    difference = (before["outputs"].pred_masks - after["outputs"].pred_masks).abs().max().item()
    print(f"{config.image_size} px, batch {args.batch_size}, one modality; max |mask logit difference| {difference:.2e}")
    print("| path | aten calls | self CPU (ms) | bytes allocated by operators (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for name, result in (("gathered per image", before), ("bag weights shared", after)):
        print(f"| {name} | {result['aten_calls']} | {result['self_cpu_ms']:.0f} | {result['allocated_mib']:.1f} |")
    ops = sorted(set(before["counts"]) | set(after["counts"]), key=lambda k: before["counts"][k] - after["counts"][k])
    changed = [(op, before["counts"][op], after["counts"][op]) for op in reversed(ops)
               if before["counts"][op] != after["counts"][op]]
    print("\n| operator | gathered | shared |\n| --- | ---: | ---: |")
    for op, b, a in changed[:25]:
        print(f"| {op} | {b} | {a} |")
    with contextlib.suppress(BrokenPipeError):
        print()


if __name__ == "__main__":
    main()
