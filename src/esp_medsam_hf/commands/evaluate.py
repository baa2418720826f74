"""``esp-medsam evaluate``: score a model on the test splits and write tables, JSON, a bar chart and overlays."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved EspMedSamModel (save_pretrained)")
    parser.add_argument(
        "--domains", nargs="+", default=None, metavar="DOMAIN",
        help="domain names or the groups all/source/unseen (default: all available)",
    )
    parser.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (default), 'real' (the embedded real DSB 2018 image), or a folder made by esp-medsam prepare",
    )
    parser.add_argument("--output", required=True, help="folder for results.md, results.json, dice_hd.png, cases/")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-images", type=int, help="evaluate at most this many images per domain")
    parser.add_argument("--predicted-modality", action="store_true", help="let the model choose each image's modality")
    parser.add_argument("--no-hausdorff", action="store_true", help="skip the Hausdorff distance (faster)")
    parser.add_argument("--num-per-split", type=int, default=8, help="synthetic test images per domain (default 8)")
    parser.add_argument("--size", type=int, help="synthetic image size (default: the model's input size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


REPORT_FILES = ("results.md", "results.json", "dice_hd.png", "cases")
"""What ``evaluate`` writes into its output folder (all that ``--overwrite`` may replace)."""


def load_model(path: str, device: str | None = None):
    """``(model, processor)`` from a folder; the processor defaults to the model's input size if none was saved."""
    import torch

    from ..image_processing_esp_medsam import EspMedSamImageProcessor
    from ..modeling_esp_medsam import EspMedSamModel
    from ..processing_esp_medsam import EspMedSamProcessor

    model = EspMedSamModel.from_pretrained(path)
    try:
        processor = EspMedSamProcessor.from_pretrained(path)
    except (OSError, ValueError):
        size = model.config.image_size
        processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": size, "width": size}))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def load_data(args: argparse.Namespace, image_size: int) -> tuple[dict, str]:
    """``({name: Dataset or DatasetDict}, label)`` for ``--data``."""
    from pathlib import Path

    from ..data.domains import resolve_domains
    from ..data.prepare import PreparationError, prepared_domains

    if args.data == "synthetic":
        from ..data.synthetic import synthetic_domains

        size = args.size or image_size
        names = [d.name for d in resolve_domains(args.domains)]
        data = synthetic_domains(names, {args.split: args.num_per_split}, seed=args.seed, size=size)
        return data, f"SYNTHETIC data ({args.num_per_split} images per domain, {size} px, seed {args.seed})"
    if args.data == "real":
        from ..data.real import dsb2018_real_case

        return {"dsb": dsb2018_real_case()}, "REAL: one DSB 2018 image (stardist), 125 nuclei"
    import datasets

    root = Path(args.data)
    available = prepared_domains(root)
    names = [d.name for d in resolve_domains(args.domains)] if args.domains else available
    missing = [name for name in names if name not in available]
    if not available or missing:
        raise PreparationError(f"{root}: no prepared data for {', '.join(missing or names) or 'any domain'}")
    data = {}
    for name in names:
        arrow = root / name / "arrow"
        if arrow.is_dir():
            data[name] = datasets.load_from_disk(str(arrow))
        else:
            files = {args.split: str(root / name / "data" / f"{args.split}-*.parquet")}
            data[name] = datasets.load_dataset("parquet", data_files=files)
    synthetic = (root / ".synthetic").exists()
    return data, f"{'SYNTHETIC' if synthetic else 'prepared'} data from {root}"


def run(args: argparse.Namespace) -> int:
    from ..data.evaluation import evaluate_model, write_report
    from ..data.prepare import PreparationError

    from ..fileio import check_replaceable

    try:
        if args.overwrite:
            data = None if args.data in ("synthetic", "real") else args.data
            check_replaceable(args.output, inputs=[args.model, data], owned=REPORT_FILES,
                              command="esp-medsam evaluate")
        model, processor = load_model(args.model, args.device)
        data, label = load_data(args, model.config.image_size)
        cases: dict = {}
        report = evaluate_model(
            model, processor, data, split=args.split, batch_size=args.batch_size,
            compute_hausdorff=not args.no_hausdorff, given_modality=not args.predicted_modality,
            max_images=args.max_images, cases=cases,
        )
        report["model"] = str(args.model)
        output = write_report(report, args.output, cases=cases, data_label=label, overwrite=args.overwrite)
    except (PreparationError, KeyError, FileExistsError, OSError) as error:
        print(f"esp-medsam evaluate: error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 1
    print((output / "results.md").read_text())
    print(f"written: {output}/results.md, results.json, dice_hd.png, cases/")
    return 0
