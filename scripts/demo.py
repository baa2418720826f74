"""The main job: ``python scripts/demo.py [--output outputs/demo] [--quick]``, the same as ``esp-medsam demo``."""

import argparse
import logging
import sys

import esp_medsam_hf
from esp_medsam_hf.commands import demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo.add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    esp_medsam_hf.register()
    sys.exit(demo.run(parser.parse_args()))
