"""Reload a published model from a Hub revision and segment the real images; run as its own process.

``python -m esp_medsam_hf.training.reload_check --repo R --revision main --reference DIR --output DIR`` must start
with ``HF_ENDPOINT`` already set (huggingface_hub reads it once, at import), which is why the demo runs it as a
child process pointed at the local Hub. It checks that ``EspMedSamModel.from_pretrained(repo, revision=...)`` (and
``AutoModel``) give the outputs of the local folder ``--reference``, segments the real
images of :mod:`esp_medsam_hf.assets` with the reloaded model, writes one overlay PNG per image and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def real_images() -> list[dict]:
    """The real images shipped by PyPI packages: name, RGB array, modality, ground truth (or None), source."""
    from ..assets import (
        CHEST_XRAY_DICOM,
        DSB2018_IMAGE,
        FUNDUS_IMAGE,
        HISTOLOGY_IMAGE,
        NUCLEAR_IMAGE,
        load_dsb2018_pair,
    )
    from ..models.esp_medsam.image_reading import load_image

    items = []
    for name, asset, modality in (
        ("dsb2018_nuclei", DSB2018_IMAGE, "microscopy"),
        ("chest_xray_dicom", CHEST_XRAY_DICOM, "x-ray"),
        ("retina_fundus", FUNDUS_IMAGE, "fundus"),
        ("nuclear_fluorescence", NUCLEAR_IMAGE, "microscopy"),
        ("histology_he", HISTOLOGY_IMAGE, "microscopy"),
    ):
        if not asset.available():
            logger.warning("skipping %s: %s is not installed (%s)", name, asset.package, asset.requirement)
            continue
        if asset is DSB2018_IMAGE:
            image, mask = load_dsb2018_pair()
        else:
            image, _ = load_image(asset.path())
            mask = None
        items.append({"name": name, "image": image, "modality": modality, "mask": mask,
                      "source": f"{asset.requirement}: {asset.relative_path}"})
    return items


def segment_real_images(model, processor, output_dir: Path) -> list[dict]:
    """Segment every real image with its modality given (and report the classifier's own choice) on the path users
    take (the automatic backend, as ``esp-medsam segment``); overlays."""
    from ..drawing import overlay, save_png
    from ..models.esp_medsam.prediction import predict
    from ..metrics.functional import dice_score

    records = []
    for item in real_images():
        prediction = predict(model, processor, [item["image"]], [item["modality"]], backend=None)
        mask = prediction.masks[0]
        picture = overlay(item["image"], item["mask"], mask)
        path = save_png(picture, output_dir / f"{item['name']}_overlay.png")
        record = {
            "name": item["name"], "source": item["source"], "modality": item["modality"],
            "size": list(item["image"].shape[:2]), "foreground_percent": float(mask.mean() * 100),
            "classifier_modality": model.config.modality_names[prediction.classifier_modality[0]],
            "classifier_probability": max(prediction.modality_probabilities[0]), "overlay": str(path),
            "scale": prediction.scales[0], "object_size": prediction.object_sizes[0],
        }
        if item["mask"] is not None:
            record["dice"] = dice_score(mask, item["mask"])
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("--reference", required=True, help="local folder of the same model, to compare outputs")
    parser.add_argument("--output", required=True, help="folder for the overlays of the real images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch
    from transformers import AutoModel

    from .. import EspMedSamImageProcessor, EspMedSamModel, EspMedSamProcessor

    model = EspMedSamModel.from_pretrained(args.repo, revision=args.revision).eval()
    # The processor is rebuilt from the published preprocessor config: ProcessorMixin.from_pretrained also lists
    # the repo's "additional_chat_templates" folder, which the local Hub answers with 401 instead of 404 when absent.
    image_processor = EspMedSamImageProcessor.from_pretrained(args.repo, revision=args.revision)
    processor = EspMedSamProcessor(image_processor, modality_names=model.config.modality_names)
    reference = EspMedSamModel.from_pretrained(args.reference).eval()
    remote = AutoModel.from_pretrained(args.repo, revision=args.revision, trust_remote_code=True).eval()
    size = model.config.image_size
    # two images of two modalities: every weight the comparison needs (shared and two bags), at half the cost of four
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    modality = torch.tensor([0, model.config.num_modalities - 1])
    with torch.inference_mode():
        expected = reference(pixel_values=pixels, modality=modality).pred_masks
        difference = float((model(pixel_values=pixels, modality=modality).pred_masks - expected).abs().max())
        remote_difference = float((remote(pixel_values=pixels, modality=modality).pred_masks - expected).abs().max())
    records = segment_real_images(model.optimize_for_inference(), processor, Path(args.output))
    result = {
        "repo": args.repo, "revision": args.revision, "max_abs_difference": difference,
        "auto_model_class": f"{type(remote).__module__}.{type(remote).__name__}",
        "auto_model_max_abs_difference": remote_difference, "real_images": records,
        "mean_real_dice": float(np.mean([r["dice"] for r in records if "dice" in r])) if records else None,
    }
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
