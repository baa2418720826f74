#!/usr/bin/env python
"""Score a model on the domains' test splits: the same as ``esp-medsam evaluate`` (see docs/data.md).

Example: python scripts/evaluate.py --model runs/tiny --data synthetic --output runs/tiny/eval
"""

import sys

from esp_medsam_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
