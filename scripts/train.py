"""Train one ESP-MedSAM stage: ``accelerate launch scripts/train.py --stage teacher|distill|espmedsam [options]``.

The same as ``esp-medsam train``; see docs/training.md.
"""

import argparse
import logging
import sys

import esp_medsam_hf
from esp_medsam_hf.commands import train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    train.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    esp_medsam_hf.register()
    sys.exit(train.run(parser.parse_args()))
