#!/usr/bin/env python
"""Build the ESP-MedSAM domains as datasets: the same as ``esp-medsam prepare`` (see docs/data.md).

Example: python scripts/prepare_datasets.py --domains isic --data-dir ~/data/ISIC2018 --output data/
"""

import sys

from esp_medsam_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
