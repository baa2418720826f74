#!/usr/bin/env python
"""Segment image files and folders: the same as ``esp-medsam segment`` (see docs/inference.md).

Example: python scripts/segment.py scans/ chest.dcm --model runs/esp/final --output runs/segmentation
Several GPUs or machines: accelerate launch scripts/segment.py scans/ --model ... --output ...
"""

import sys

from esp_medsam_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
