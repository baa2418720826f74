#!/usr/bin/env python
"""How much of a model's error on mnfinder is the micronuclei that mnfinder's nucleus masks leave out on purpose
(docs/training.md, "Micronuclei"): per magnification of the scale table, Dice, Dice with the micronuclei as don't
care, and the share of the model's false-positive pixels that lie on them (``esp_medsam_hf.data.left_out``; the
evaluation's scale table carries the same column).

Example (the main job's model and data):
    python scripts/mnfinder_micronuclei.py --model OUTPUT/stage-3-esp-medsam/release --data OUTPUT/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esp_medsam_hf.commands import add_backend_argument, error_message
from esp_medsam_hf.commands.evaluate import load_data, load_model
from esp_medsam_hf.data.left_out import MARGIN, left_out_markdown
from esp_medsam_hf.data.prepare import PreparationError
from esp_medsam_hf.data.prepared import PreparedDataError
from esp_medsam_hf.data.real import mnfinder_micronuclei
from esp_medsam_hf.data.scale_table import ZOOMS, check_zoom, dataset_pairs, scale_table
from esp_medsam_hf.models.esp_medsam.fileio import atomic_file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="folder of a saved EspMedSamModel (save_pretrained)")
    parser.add_argument("--data", default="real",
                        help="a folder made by esp-medsam prepare that holds mnfinder (a main job's OUTPUT/data), or "
                        "'real' (default: mnfinder prepared from its wheel into the archive cache)")
    parser.add_argument("--split", default="test", help="split to score (default: test)")
    parser.add_argument("--zooms", type=float, nargs="+", default=list(ZOOMS),
                        help="magnifications: 0.5 (2x2 mosaic) or >= 1 (centre crop; default 0.5 1 2 4)")
    parser.add_argument("--margin", type=int, default=MARGIN, help=f"px each micronucleus is grown by (default {MARGIN})")
    parser.add_argument("--output", help="also write the table to this Markdown file")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output) if args.output else None
    try:
        if output is not None and output.exists() and not args.overwrite:
            raise FileExistsError(f"--output {output} exists; pass --overwrite to replace it")
        if args.margin < 0:
            raise ValueError(f"--margin must be >= 0 pixels, got {args.margin}")
        for zoom in args.zooms:  # before the model loads
            try:
                check_zoom(zoom)
            except ValueError:
                raise ValueError(f"--zooms must be 0.5 or at least 1, got {' '.join(map(str, args.zooms))}") from None
        model, processor = load_model(args.model)
        request = argparse.Namespace(data=args.data, domains=["mnfinder"], split=args.split)
        dataset = load_data(request, model.config.image_size)[0]["mnfinder"][args.split]
        pairs, modality = dataset_pairs(dataset)
        micronuclei = ("micronuclei", mnfinder_micronuclei(dataset["file_name"]))
        rows = scale_table(model, processor, pairs, modality, zooms=args.zooms, extra_views=False,
                           backend=args.backend, left_out=micronuclei, margin=args.margin,
                           progress=not args.no_progress)["rows"]
        table = f"mnfinder {args.split} ({len(pairs)} images), micronuclei left out of the nucleus masks\n\n"
        table += left_out_markdown(rows, "micronuclei", args.margin)
        if output is not None:
            with atomic_file(output) as temporary:
                Path(temporary).write_text(table)
    except (PreparationError, PreparedDataError, KeyError, FileExistsError, OSError, ValueError) as error:
        print(f"mnfinder_micronuclei: error: {error_message(error)}", file=sys.stderr)
        return 1
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
