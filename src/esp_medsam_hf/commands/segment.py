"""``esp-medsam segment``: segment image files and folders (DICOM included), writing masks, overlays and a CSV."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import add_backend_argument

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (searched recursively)")
    parser.add_argument("--model", required=True, help="saved model folder or Hub repo id")
    parser.add_argument("--revision", help="Hub branch, tag or commit of --model (e.g. a training stage)")
    parser.add_argument(
        "--modality", help="modality name or index for every image (default: DICOM tag, else the model's classifier)"
    )
    parser.add_argument("--output", default="segmentation", help="output folder (default: ./segmentation)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--device", help="torch device (default: accelerate's device for this process)")
    add_backend_argument(parser)
    parser.add_argument(
        "--scale",
        help="auto (default, from the model's preprocessor_config.json: a coarse pass estimates the objects' size), "
        "whole (the whole image resized into the model's input), a zoom factor of the native pixels (1 = native, "
        "tiled), or the objects' size in pixels such as 30px",
    )
    parser.add_argument("--tile-size", type=int, help="tile side in pixels (default: the model's input size)")
    parser.add_argument("--overlap", type=int, help="overlap of neighbouring tiles in pixels (default: a quarter tile)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing masks, overlays and CSV")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from ..inference import CSV_NAME, OutputExistsError, load_pipeline, run_segmentation

    if args.batch_size < 1:
        logger.error("--batch-size must be at least 1, got %d", args.batch_size)
        return 2
    modality = int(args.modality) if args.modality is not None and args.modality.isdigit() else args.modality
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        logger.error("--output %s is a file; expected a folder", output)
        return 2
    if (output / CSV_NAME).exists() and not args.overwrite:  # checked again, with the inputs, before any image
        logger.error("%s exists; pass --overwrite to replace it", output / CSV_NAME)
        return 2
    try:
        pipe = load_pipeline(args.model, revision=args.revision, device=args.device, progress=not args.no_progress,
                             backend=args.backend, scale=args.scale, tile_size=args.tile_size, overlap=args.overlap)
        records = run_segmentation(
            args.paths,
            pipe,
            args.output,
            modality=modality,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (OutputExistsError, FileNotFoundError, ValueError, OSError, ImportError) as error:
        logger.error("%s", error)
        return 2
    failed = [record for record in records if record.status != "ok"]
    logger.info(
        "segmented %d of %d image(s); CSV: %s", len(records) - len(failed), len(records), f"{args.output}/{CSV_NAME}"
    )
    for record in failed:
        logger.error("failed: %s: %s", record.file, record.error)
    return 1 if failed else 0
