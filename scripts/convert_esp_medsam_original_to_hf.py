#!/usr/bin/env python
"""Convert official ESP-MedSAM checkpoints to a transformers folder (model, processor, remote code).

    python scripts/convert_esp_medsam_original_to_hf.py --checkpoint esp_medsam.pth --output esp-medsam-hf
    python scripts/convert_esp_medsam_original_to_hf.py --checkpoint dermoscopy=a.pth --checkpoint x-ray=b.pth \
        --output esp-medsam-hf

One checkpoint: its single parameter bag is copied into all six modalities (the official encoder ignores the
domain index, so this reproduces every official output). One checkpoint per modality: merged when their shared
weights are equal, refused otherwise with the differing tensors named. Unused official tensors (classification
head, prompt-encoder embeddings) are dropped and listed; any other missing or unexpected key is an error.
"""

import sys

from esp_medsam_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
