"""``esp-medsam evaluate``: score a model on the test splits and write tables, JSON, a bar chart and overlays."""

from __future__ import annotations

import argparse
import os
import sys

from . import add_backend_argument, error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved EspMedSamModel (save_pretrained)")
    parser.add_argument(
        "--domains", nargs="+", default=None, metavar="DOMAIN",
        help="domain names or the groups all/source/unseen/real (default: all available)",
    )
    parser.add_argument(
        "--data", default="synthetic",
        help="'synthetic' (default), 'real' (the real domains that install offline: mnfinder, vascx, dsb-stardist), "
        "or a folder made by esp-medsam prepare (your own data too)",
    )
    references = parser.add_mutually_exclusive_group()
    references.add_argument(
        "--references", nargs="+", choices=REFERENCES, default=None,
        help="reference methods scored on the same images (default: both for real and prepared data, none for "
        "synthetic data); Otsu's polarity is learnt on each domain's train split where it has one",
    )
    references.add_argument("--no-references", dest="references", action="store_const", const=[],
                            help="score no reference method")
    parser.add_argument("--output", required=True, help="folder for results.md, results.json, dice_hd.png, cases/")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward (default: 2 on a CPU, where larger batches are slower; 8 on a GPU)")
    parser.add_argument("--max-images", type=int, help="evaluate at most this many images per domain")
    parser.add_argument("--predicted-modality", action="store_true", help="let the model choose each image's modality")
    parser.add_argument("--no-hausdorff", action="store_true", help="skip the Hausdorff distance (faster)")
    parser.add_argument("--num-per-split", type=int, default=8, help="synthetic test images per domain (default 8)")
    parser.add_argument("--size", type=int, help="synthetic image size (default: the model's input size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_backend_argument(parser)
    parser.add_argument(
        "--scale", default=None,
        help="inference scale: auto (default, the model's saved setting), whole, a zoom factor of the native pixels "
        "(1 = native, tiled) or an object size such as 30px",
    )
    parser.add_argument(
        "--no-scale-table", action="store_true",
        help="skip the scale table (Dice at x0.5, x1, x2, x4 beside Otsu on the microscopy and fundus domains)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


REFERENCES = ("otsu", "litemedsam-boxes")


def check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be checked before any work: the numbers, the output folder (a file, or a folder that is
    not empty without ``--overwrite``, or one that ``--overwrite`` may not replace), the model folder, and a
    prepared ``--data`` folder with the ``--domains`` asked for."""
    from ..models.esp_medsam.fileio import check_replaceable

    for name in ("batch_size", "max_images", "num_per_split", "size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if os.path.lexists(args.output) and not os.path.isdir(args.output):
        raise FileExistsError(f"--output {args.output} is a file; expected a folder (new or of evaluate's outputs)")
    if not args.overwrite and os.path.isdir(args.output) and os.listdir(args.output):
        raise FileExistsError(f"--output {args.output} already exists and is not empty; pass --overwrite to replace "
                              "its results, or choose another folder")
    if args.overwrite:
        data = None if args.data in ("synthetic", "real") else args.data
        check_replaceable(args.output, inputs=[args.model, data], owned=REPORT_FILES, command="esp-medsam evaluate")
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model} is not a folder; expected a saved EspMedSamModel")
    if args.data not in ("synthetic", "real"):  # a prepared folder and its domains, before the model loads
        from ..data.prepared import prepared_names

        prepared_names(args.data, args.domains)


def learn_references(references: dict, args: argparse.Namespace, names: list[str]) -> None:
    """Learn Otsu's polarity on each domain's train split, for real and prepared data whose domains have one."""
    from pathlib import Path

    from ..data.prepared import PreparedDataError, load_domains

    otsu = references.get("otsu")
    if otsu is None or args.data == "synthetic" or args.split == "train":
        return
    if args.data == "real":
        from ..data.real import archive_dir

        root = archive_dir().parent / "prepared"
    else:
        root = Path(args.data)
    for name in names:
        try:
            train = load_domains(root, [name], splits={"train": 0})[name]["train"]
        except PreparedDataError:
            continue  # no train split: the modality's polarity, which the report says
        otsu.learn(name, train)


REPORT_FILES = ("results.md", "results.json", "dice_hd.png", "cases")
"""What ``evaluate`` writes into its output folder (all that ``--overwrite`` may replace)."""


def load_model(path: str, device: str | None = None):
    """``(model, processor)`` from a folder; the processor defaults to the model's input size if none was saved."""
    import torch

    from ..models.esp_medsam.image_processing_esp_medsam import EspMedSamImageProcessor
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

    model = EspMedSamModel.from_pretrained(path)
    try:
        processor = EspMedSamProcessor.from_pretrained(path)
    except (OSError, ValueError):
        size = model.config.image_size
        processor = EspMedSamProcessor(EspMedSamImageProcessor(size={"height": size, "width": size}))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).optimize_for_inference(), processor


def load_data(args: argparse.Namespace, image_size: int) -> tuple[dict, str]:
    """``({name: DatasetDict}, label)`` for ``--data``, through the loader that training uses too."""
    from pathlib import Path

    from ..data.domains import REAL_DOMAIN_NAMES, resolve_domains
    from ..data.prepared import load_domains, prepared_domains

    if args.data == "synthetic":
        size = args.size or image_size
        names = [d.name for d in resolve_domains(args.domains)]
        data = load_domains("synthetic", names, splits={args.split: args.num_per_split}, seed=args.seed, size=size)
        return data, f"SYNTHETIC data ({args.num_per_split} images per domain, {size} px, seed {args.seed})"
    if args.data == "real":
        from ..data.real import archive_dir, prepare_real_domains

        root = archive_dir().parent / "prepared"
        names = [d.name for d in resolve_domains(args.domains)] if args.domains else list(REAL_DOMAIN_NAMES)
        prepare_real_domains([name for name in names if name not in prepared_domains(root)], root)
        label = ("REAL images: mnfinder nuclei (hand-made masks), vascx fundus (vessel masks made by vascx's "
                 "models), the stardist DSB 2018 image")
    else:
        root = Path(args.data)
        names = args.domains or prepared_domains(root)
        label = f"{'SYNTHETIC' if (root / '.synthetic').exists() else 'prepared'} data from {root}"
    return load_domains(root, names, splits={args.split: 0}), label


def domain_targets(args: argparse.Namespace, names: list[str], config) -> dict[str, str]:
    """``{domain: target}`` for the prepared domains whose ``domain.json`` records a target of their own (a new
    target added to a modality) or a new modality (its target); the model must have it."""
    from ..data.prepared import prepared_domain_spec

    if args.data in ("synthetic", "real"):
        return {}
    specs = {name: prepared_domain_spec(args.data, name) for name in names}
    for name, spec in specs.items():
        if spec.new_modality is not None and spec.new_modality not in config.modality_names:
            raise ValueError(f"domain {name!r} records the new modality {spec.new_modality!r}, which the model does "
                             f"not have (its modalities: {', '.join(config.modality_names)}); train it with "
                             f"--new-modality {spec.new_modality} --like {spec.modality} first")
    targets = {name: spec.target for name, spec in specs.items() if spec.target_name or spec.new_modality}
    for name, target in targets.items():
        if target not in config.all_target_names:
            raise ValueError(f"domain {name!r} records the target {target!r}, which the model does not have (its "
                             f"targets: {', '.join(config.all_target_names)}); train it with --new-target first")
    return targets


def run(args: argparse.Namespace) -> int:
    from ..data.baselines import reference_methods
    from ..data.evaluation import evaluate_model, write_report
    from ..data.prepare import PreparationError
    from ..data.prepared import PreparedDataError
    from accelerate import PartialState

    from ..data.scale_table import scale_tables

    state = PartialState()  # under accelerate launch: each process scores its share, the main one writes
    try:
        check_arguments(args)
        model, processor = load_model(args.model, args.device or str(state.device))
        with state.main_process_first():  # real data is prepared once, by the main process
            data, label = load_data(args, model.config.image_size)
        cases: dict = {}
        names = args.references if args.references is not None else (() if args.data == "synthetic" else REFERENCES)
        references = reference_methods(tuple(names))
        learn_references(references, args, list(data))
        report = evaluate_model(
            model, processor, data, split=args.split, batch_size=args.batch_size,
            compute_hausdorff=not args.no_hausdorff, given_modality=not args.predicted_modality,
            max_images=args.max_images, cases=cases, references=references, scale=args.scale, distributed=True,
            target=domain_targets(args, list(data), model.config), backend=args.backend,
        )
        if not state.is_main_process:
            return 0
        if not args.no_scale_table:
            report["scale_tables"] = scale_tables(model, processor, data, split=args.split, scale=args.scale,
                                                  max_images=args.max_images, backend=args.backend)
        report["model"] = str(args.model)
        output = write_report(report, args.output, cases=cases, data_label=label, overwrite=args.overwrite)
    except (PreparationError, PreparedDataError, KeyError, FileExistsError, OSError, ValueError) as error:
        print(f"esp-medsam evaluate: error: {error_message(error)}", file=sys.stderr)
        return 1
    print((output / "results.md").read_text())
    print(f"written: {output}/results.md, results.json, dice_hd.png, cases/")
    return 0
