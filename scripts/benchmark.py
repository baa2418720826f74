#!/usr/bin/env python
"""Benchmark ESP-MedSAM against its peers: the same as ``esp-medsam benchmark`` (see docs/benchmark.md).

Runs the command module directly (not through the full ``esp-medsam`` parser), so it works from a source checkout
with ``PYTHONPATH=src`` on a machine that lacks the other commands' dependencies.

Examples:
    python scripts/benchmark.py --output runs/bench_cpu
    python scripts/benchmark.py --device cuda --output runs/bench_gpu
    python scripts/benchmark.py --quick --output /tmp/bench_quick
"""

import argparse
import logging
import sys

import esp_medsam_hf
from esp_medsam_hf.commands import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmark.py", description=benchmark.__doc__)
    benchmark.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    esp_medsam_hf.register()
    sys.exit(benchmark.run(parser.parse_args()))
