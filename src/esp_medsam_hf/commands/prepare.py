"""``esp-medsam prepare``: build the domains' datasets (from downloaded data, or synthetic) and optionally push them."""

from __future__ import annotations

import argparse
import sys

from . import error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--domains", nargs="+", default=None, metavar="DOMAIN",
        help="domain names, or the groups all/source/unseen/real (default: all with --synthetic, else required); "
        "the real domains (mnfinder, vascx, dsb-stardist) come from package archives and need no --data-dir; with "
        "--layout plain and --modality, one new name for your own data",
    )
    parser.add_argument(
        "--data-dir",
        help="folder holding the downloaded data in an accepted layout (plain layout: images/ + masks/ folders, or "
        "a CSV/JSON listing of image,mask[,split])",
    )
    parser.add_argument("--output", required=True, help="output folder (one sub-folder per domain + README.md)")
    parser.add_argument("--layout", help="force a layout (default: detected); see docs/data.md")
    parser.add_argument(
        "--modality", help="modality of your own domain (dermoscopy, x-ray, ultrasound, fundus, microscopy, "
        "colonoscopy; another name with --like)"
    )
    parser.add_argument(
        "--target", help="your own domain: what its masks show when it is not the modality's own target (e.g. "
        "'optic disc' for fundus); recorded in domain.json, training adds it as a new target and evaluation decodes it"
    )
    parser.add_argument(
        "--like", help="your own domain of a modality that is none of the six (--modality NAME): the one it is like "
        "(recorded in domain.json; training adds NAME as a new modality from it)"
    )
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="your own data: share of unsplit images for validation (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="your own data: share of unsplit images for testing (default 0.2)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that split (default 0)")
    parser.add_argument(
        "--strict", action="store_true", help="fail if a listed file is missing or a found file is unlisted"
    )
    parser.add_argument(
        "--skip-invalid", action="store_true", help="skip bad files (counted and reported) instead of failing"
    )
    parser.add_argument(
        "--mask-threshold", type=float, help="binarise masks as value > T instead of requiring binary masks"
    )
    parser.add_argument("--size", type=int, help="resize images (bilinear) and masks (nearest) to SIZE x SIZE")
    parser.add_argument("--overwrite", action="store_true", help="replace domains already in the output folder")
    parser.add_argument(
        "--keep-metadata", action="store_true",
        help="keep the PNG text chunks and EXIF of your files in the dataset (default: dropped, as they may name a "
        "patient; pixels are unchanged either way)",
    )
    parser.add_argument("--synthetic", action="store_true", help="write SYNTHETIC domains instead of reading data")
    parser.add_argument("--num-per-split", type=int, default=8, help="synthetic images per split (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the output folder to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")


def _summary_line(report) -> str:
    rows = ", ".join(f"{split} {count}" for split, count in report.rows.items())
    return (
        f"{report.domain}: layout {report.layout}; rows {rows}; missing {len(report.missing)}, "
        f"unlisted {len(report.unlisted)}, skipped {len(report.skipped)}; {report.images_per_second:.1f} images/s"
    )


def _domains(args: argparse.Namespace) -> list:
    """The domains the call names: registered names and groups, or one new domain of ``--modality``."""
    from ..data.domains import GROUPS, custom_domain, get_domain, resolve_domains
    from ..data.prepare import PreparationError

    if args.modality is None:
        if args.target is not None:
            raise PreparationError("--target names what the masks of your own domain show: pass it with --modality")
        if args.like is not None:
            raise PreparationError("--like names the modality your own domain's new modality is like: pass it with "
                                   "--modality NAME")
        return resolve_domains(args.domains)
    if args.synthetic or not args.domains or len(args.domains) != 1 or args.domains[0] in GROUPS:
        raise PreparationError("--modality names the modality of ONE new domain: pass --domains NAME "
                               "(your own name) with --data-dir")
    try:
        get_domain(args.domains[0])
        raise PreparationError(f"{args.domains[0]!r} is a registered domain; --modality is for your own "
                               "data: choose another name")
    except KeyError:
        pass
    if args.like is None:
        return [custom_domain(args.domains[0], args.modality, target=args.target)]
    return [custom_domain(args.domains[0], args.like, target=args.target, new_modality=args.modality)]


def _check_output(args: argparse.Namespace, domains: list) -> None:
    """Before any domain is read or generated: the output is no file, a domain already there needs
    ``--overwrite``, and a README.md that is not prepare's own is never replaced (``check_card_replaceable``)."""
    from pathlib import Path

    from ..data.prepared import check_card_replaceable

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; expected a folder")
    present = [domain.name for domain in domains if (output / domain.name).exists()]
    if present and not args.overwrite:
        raise FileExistsError(f"{output} already holds {', '.join(present)}; pass --overwrite to replace "
                              f"{'them' if len(present) > 1 else 'it'}")
    check_card_replaceable(output, args.overwrite)


def _prepare_synthetic(args: argparse.Namespace, domains: list) -> None:
    """Write SYNTHETIC stand-ins of ``domains`` (``--synthetic``)."""
    import time

    from ..data.prepare import write_output
    from ..data.synthetic import DEFAULT_SIZE, synthetic_domain

    size = args.size or DEFAULT_SIZE
    for domain in domains:
        start = time.perf_counter()
        dataset_dict = synthetic_domain(domain.name, args.num_per_split, seed=args.seed, size=size)
        seconds = time.perf_counter() - start
        report = {"domain": domain.name, "synthetic": True, "seed": args.seed, "size": size,
                  "rows": {split: len(ds) for split, ds in dataset_dict.items()}, "seconds": seconds}
        write_output(dataset_dict, args.output, domain.name, report, overwrite=args.overwrite, synthetic=True)
        total = sum(report["rows"].values())
        print(f"{domain.name}: SYNTHETIC, {total} rows, {total / seconds:.1f} images/s")


def _prepare_files(args: argparse.Namespace, domains: list) -> None:
    """Prepare the real domains and ``--data-dir``'s files of the others, and print what each holds."""
    from ..data.prepare import PreparationError, prepare_domain
    from ..data.real import prepare_real_domains

    real = [domain for domain in domains if domain.origin == "real"]
    if not args.domains or (len(real) < len(domains) and not args.data_dir):
        raise PreparationError("--domains and --data-dir are required (or pass --synthetic; the real "
                               "domains need no --data-dir)")
    reports = list(prepare_real_domains([d.name for d in real], args.output, overwrite=args.overwrite,
                                        size=args.size).values())
    for domain in domains:
        if domain.origin == "real":
            continue
        _, report = prepare_domain(
            domain, args.data_dir, args.output, overwrite=args.overwrite, layout=args.layout,
            strict=args.strict, skip_invalid=args.skip_invalid, mask_threshold=args.mask_threshold,
            size=args.size, validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
            split_seed=args.split_seed, keep_metadata=args.keep_metadata,
        )
        reports.append(report)
    for report in reports:
        print(_summary_line(report))
        for label, names in (("missing", report.missing), ("unlisted", report.unlisted)):
            if names:
                print(f"  {label}: {', '.join(names)}")
        for skipped in report.skipped:
            print(f"  skipped {skipped['file_name']}: {skipped['reason']}")


def run(args: argparse.Namespace) -> int:
    from ..data.layouts import LayoutError
    from ..data.prepare import PreparationError
    from ..hub import PublishError, push_prepared

    try:
        domains = _domains(args)
        if args.synthetic or args.data_dir or not args.push_to_hub:
            _check_output(args, domains)
        if args.synthetic:
            _prepare_synthetic(args, domains)
        elif args.data_dir or not args.push_to_hub:
            _prepare_files(args, domains)
        if args.push_to_hub:
            commit = push_prepared(args.output, args.push_to_hub, token=args.token, private=args.private)
            print(f"pushed {args.output} to {args.push_to_hub}, commit {commit}")
    except (PreparationError, LayoutError, KeyError, ValueError, OSError, PublishError) as error:
        print(f"esp-medsam prepare: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0
