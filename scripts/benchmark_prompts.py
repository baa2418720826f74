#!/usr/bin/env python
"""A prompt on a cached image embedding against a full forward, in one run (docs/benchmark.md, "Prompts").

Examples:
    python scripts/benchmark_prompts.py                      # official size at 1024 px on the CPU
    python scripts/benchmark_prompts.py --tiny --image-size 64 --iterations 1
"""

import argparse
import json

from esp_medsam_hf.benchmark.prompts import measure_prompt_cost

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmark_prompts.py", description=__doc__)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny test configuration (a smoke test)")
    args = parser.parse_args()
    result = measure_prompt_cost(args.image_size, args.iterations, device=args.device, tiny=args.tiny)
    print(json.dumps(result, indent=1))
    full, prompt = result["latency_ms"]["full_forward"], result["latency_ms"]["prompt_on_cached_embedding"]
    print(f"full forward {full:.1f} ms, prompt on the cached embedding {prompt:.1f} ms: ratio {result['ratio']:.3f}")
