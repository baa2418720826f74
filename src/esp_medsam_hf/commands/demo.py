"""``esp-medsam demo``: the main job. Trains the three stages on the embedded data, evaluates, publishes every stage
to the embedded local Hub, reloads the final model from its revision and segments the real images."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="outputs/demo", help="folder for everything the demo writes")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo run")
    parser.add_argument("--quick", action="store_true", help="a reduced run (a few images and steps) to check the wiring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads (default 0: torch's choice, one per core)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    parser.add_argument(
        "--hold-out-group", default=None, metavar="GROUP",
        help="the cross-lab check: leave this mnfinder acquisition group (a folder, e.g. 2022-10-14_U2OS) out of "
             "training and test on all its images beside Otsu (not part of the main job)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.prepare import datasets_progress_bars
    from ..inference import progress_bars
    from ..testing.localhub import LocalHubError
    from ..training.data import TrainingDataError
    from ..training.demo import run_demo
    from ..training.checkpoints import NonFiniteLossError

    if args.threads:
        torch.set_num_threads(args.threads)
    # accelerate's per-checkpoint and the HTTP clients' per-request INFO lines drown the progress
    for name in ("accelerate", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # --no-progress also silences the libraries' own bars (weight loading and saving, datasets' maps)
        with progress_bars(not args.no_progress), datasets_progress_bars(not args.no_progress):
            summary = run_demo(args.output, quick=args.quick, overwrite=args.overwrite, seed=args.seed,
                               progress=not args.no_progress, threads=args.threads or None,
                               hold_out=args.hold_out_group)
    except (FileExistsError, FileNotFoundError, TrainingDataError, NonFiniteLossError, LocalHubError,
            RuntimeError) as error:
        print(f"esp-medsam demo: error: {error}", file=sys.stderr)
        return 1
    print(Path(summary["output"], "SUMMARY.md").read_text())
    print(f"everything is in {summary['output']} (SUMMARY.md, summary.json, evaluation/, real_images/, hub/)")
    return 0
