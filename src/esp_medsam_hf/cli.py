"""The ``esp-medsam`` command line: one sub-command per module, loaded only when it is run.

Every command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` (the exit code), so that
``esp-medsam --help`` stays fast and a command's heavy imports are paid only by that command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("esp_medsam_hf.commands.prepare", "build the 12 domains as datasets (downloaded data or synthetic)"),
    "evaluate": ("esp_medsam_hf.commands.evaluate", "score a model on the test splits: Dice/HD tables, plot, overlays"),
    "convert": ("esp_medsam_hf.commands.convert", "convert official ESP-MedSAM or LiteMedSAM weights"),
    "hub": ("esp_medsam_hf.commands.hub", "run the local Hub (start/stop/status) and publish stages to a Hub repo"),
    "segment": ("esp_medsam_hf.commands.segment", "segment image files and folders (DICOM too): masks, overlays, CSV"),
    "train": ("esp_medsam_hf.commands.train", "train one stage (teacher, distill, espmedsam) on Accelerate"),
    "demo": ("esp_medsam_hf.commands.demo", "the main job: train all stages on embedded data, evaluate, publish, reload"),
    "cache": ("esp_medsam_hf.commands.cache", "show or empty the cache of ONNX exports (info/clear)"),
    "benchmark": ("esp_medsam_hf.commands.benchmark", "speed of ESP-MedSAM (fast and plain) vs SAM ViT-B/H, LiteMedSAM, ONNX"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esp-medsam", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Libraries that log through the root logger itself (onnxruntime's quantiser: an INFO line per tensor) are shown
    # from WARNING up; named loggers keep the chosen level.
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING or args.verbose)
    from .registration import register

    register()  # an entry point: the models, the pipeline task and the DICOM reader, declared once
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except OSError as error:  # a file, folder, permission, disk or network problem: the user's to fix, no traceback
        from .commands import error_message

        print(f"esp-medsam {args.command}: error: {error_message(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
