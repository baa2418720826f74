"""``esp-medsam train``: one training stage (teacher, distill, espmedsam) on Accelerate; also run as
``accelerate launch scripts/train.py --stage ...`` for several GPUs or nodes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..training.config import (
    FREEZABLE,
    LR_SCHEDULES,
    STAGE_CONFIGS,
    DistillConfig,
    EspMedSamStageConfig,
    TrainingConfig,
    load_config,
    read_config_file,
)

if TYPE_CHECKING:
    from ..training.stages import StageResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags; a flag not given is None, so ``--config`` and the stage's defaults fill it.

    Written with argparse rather than ``transformers.HfArgumentParser``, which fills every flag with its dataclass
    default (so a ``--config`` YAML value could not sit between the defaults and the flags) and cannot register the
    options the three stage dataclasses share (``init_from``, every ``TrainingConfig`` field) in one parser.
    """
    parser.add_argument("--stage", required=True, choices=("teacher", "distill", "espmedsam"))
    parser.add_argument("--config", help="YAML file of the stage's options (see docs/training.md)")
    parser.add_argument("--output-dir", help="run folder (checkpoints/, best/, final/, release/, log.csv)")
    parser.add_argument("--data", help="'synthetic' or a folder written by `esp-medsam prepare`")
    parser.add_argument(
        "--domains", nargs="+",
        help="training domains, by name or group (source, real); default: the source domains of --data, else all "
        "its domains",
    )
    parser.add_argument("--model-size", choices=("official", "tiny"))
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16", "auto"),
                        help="auto: bf16 where the hardware computes it natively, else fp32")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the model for training (accelerate's inductor backend; worth it on GPUs)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every", type=int, help="also checkpoint every N optimizer steps")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--lr-decay", type=float, help="learning-rate factor applied after every epoch (0, 1]")
    parser.add_argument("--keep-checkpoints", type=int, help="periodic checkpoints kept (older ones are deleted)")
    parser.add_argument("--eval-every", metavar="N|epoch|end",
                        help="validate, keep the best model and checkpoint every N optimizer steps, after every "
                             "epoch (default) or only at the end (end or 0)")
    parser.add_argument("--early-stopping-patience", type=int, metavar="K",
                        help="stop after K validations in a row without a better validation metric")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help="exponential (default: times --lr-decay after every epoch) or a transformers schedule "
                             "stepped with the optimizer, e.g. cosine")
    parser.add_argument("--warmup-steps", type=int, help="with a transformers --lr-schedule: linear warmup steps")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run folder")
    parser.add_argument("--report-to", nargs="+", help="accelerate trackers (tensorboard, wandb, ...)")
    add_stage_arguments(parser)


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of one stage or of the encoder's freezing and caching (see ``add_arguments``)."""
    parser.add_argument("--sam-checkpoint", help="teacher: SAM weights (facebook/sam-vit-b|l|huge or a folder)")
    parser.add_argument("--sam-preset", choices=("vit-b", "vit-l", "vit-h"), help="teacher: SAM encoder size")
    parser.add_argument("--teacher", help=f"distill: the stage-1 teacher folder (default: {DistillConfig.teacher})")
    parser.add_argument("--natural-images", help="distill: folder or dataset of natural images (default: skimage)")
    parser.add_argument(
        "--init-from", help="initial ESP-MedSAM folder, or 'litemedsam' (teacher: an ESP-MedSAM teacher on it); "
        f"espmedsam default: {EspMedSamStageConfig.init_from}",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--freeze", nargs="+", choices=FREEZABLE,
        help="teacher/espmedsam with an ESP-MedSAM model: parts kept frozen (encoder = aggregator + bags)",
    )
    parser.add_argument(
        "--cache-features", action="store_true", default=None,
        help="with --freeze encoder or --frozen-encoder-stages: encode every training image once up to there and "
             "train the rest on the stored features",
    )
    parser.add_argument("--frozen-encoder-stages", type=int, metavar="N",
                        help="keep the encoder's first N stages frozen (1: the stem; 2-4: also TinyViT stages 1-3 "
                             "with their bags)")
    parser.add_argument("--feature-views", type=int, help="with --cache-features: views per image (1-4, default 2)")
    parser.add_argument("--intensity-augment", action="store_true", default=None,
                        help="distill: the student sees intensity-shifted images, the teacher the images themselves")
    parser.add_argument("--new-target", metavar="NAME",
                        help="espmedsam: add target NAME (its own bag and mask query) to --modality and train it")
    parser.add_argument("--modality", dest="target_modality", help="espmedsam: the modality of --new-target")
    parser.add_argument("--new-modality", metavar="NAME",
                        help="espmedsam: add modality NAME (its own bag, mask query and classifier class, copied "
                             "from --like's) and train it on the domains")
    parser.add_argument("--like", dest="like_modality", metavar="MODALITY",
                        help="espmedsam: the existing modality that --new-modality starts from")
    parser.add_argument("--new-modality-target", metavar="TARGET",
                        help="espmedsam: what --new-modality segments (its label; default: NAME)")
    parser.add_argument("--train-all", dest="only_new_target", action="store_false", default=None,
                        help="with --new-target or --new-modality: also train the shared encoder and decoder (not "
                             "the classifier, prompt generator or batch norms) at --shared-lr-scale (default 0.003) "
                             "times the learning rate, holding the modality's own target with --keep-others-weight "
                             "(default 10); the other targets then change (default: only the new target's or "
                             "modality's bag and query, so the others stay bit-identical)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="publish the stage to REPO on its branch when done")
    parser.add_argument("--also-main", action="store_true", help="with --push-to-hub: also publish it as main")
    add_remaining_options(parser)


def add_remaining_options(parser: argparse.ArgumentParser) -> None:
    """A flag for every option of the stage configurations that has none above (``--weight-decay``,
    ``--no-augment``, ``--zoom JSON``, ...), typed from its dataclass field, so that every option can be given on
    the command line as in ``--config``."""
    registered = {action.dest for action in parser._actions}
    common = {f.name for f in dataclasses.fields(TrainingConfig)}
    for stage, config in STAGE_CONFIGS.items():
        for option in dataclasses.fields(config):
            if option.name in registered:
                continue
            registered.add(option.name)
            where = "every stage" if option.name in common else stage
            parser.add_argument(f"--{option.name.replace('_', '-')}", dest=option.name,
                                help=f"{where}: {option.name} (docs/training.md)", **flag_kind(str(option.type)))


def flag_kind(annotation: str) -> dict:
    """argparse settings for a configuration field of type ``annotation``; a flag not given stays None."""
    if annotation == "bool":
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if annotation.startswith("dict"):
        return {"type": json.loads, "metavar": "JSON"}
    if annotation.startswith("list"):
        return {"nargs": "+"}
    kinds = [part.strip() for part in annotation.split("|")]
    return {"type": int if "int" in kinds else float if "float" in kinds else str}


def option_names(stage: str) -> list[str]:
    """The options of ``stage``: the fields of its configuration dataclass."""
    return [option.name for option in dataclasses.fields(STAGE_CONFIGS[stage])]


def stage_config(args: argparse.Namespace) -> TrainingConfig:
    """The stage's options: its defaults, then the ``--config`` file, then the flags given; a flag of another
    stage is an error."""
    names = option_names(args.stage)
    others = sorted({name for stage in STAGE_CONFIGS for name in option_names(stage)} - set(names))
    foreign = [name for name in others if getattr(args, name, None) is not None]
    if foreign:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        raise ValueError(f"{flags}: not an option of stage {args.stage}")
    overrides = {name: getattr(args, name, None) for name in names}
    config = load_config(args.stage, args.config, **overrides)
    saved = image_size_of(getattr(config, "init_from", None))
    if saved is not None and saved != config.image_size and overrides["image_size"] is None:
        in_file = args.config is not None and "image_size" in read_config_file(args.config)
        if not in_file:
            overrides["image_size"] = saved
            config = load_config(args.stage, args.config, **overrides)
    return config


def image_size_of(folder: str | None) -> int | None:
    """The ``image_size`` of the saved model in ``folder`` (``--init-from``), or None for anything else."""
    import json
    from pathlib import Path

    if not folder or not (Path(folder) / "config.json").is_file():
        return None
    return json.loads((Path(folder) / "config.json").read_text()).get("image_size")


def run(args: argparse.Namespace) -> int:
    """Train the stage (and publish it with ``--push-to-hub``); 1 with a one-line error for bad options or data."""
    import torch
    from accelerate import PartialState

    from ..training import CheckpointError, NonFiniteLossError, TrainingDataError, run_stage

    try:
        config = stage_config(args)
        if config.threads:
            torch.set_num_threads(config.threads)
        result = run_stage(config)
        if args.push_to_hub and PartialState().is_main_process:
            publish(args, config, result)
    except (OSError, TrainingDataError, NonFiniteLossError, CheckpointError, ValueError) as error:
        from . import error_message

        print(f"esp-medsam train: error: {error_message(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        if PartialState().is_main_process:
            print(f"esp-medsam train: {interrupted_message(args, stop)}", file=sys.stderr)
        return 130
    if PartialState().is_main_process:  # under accelerate launch, one final line
        print(f"{args.stage}: release folder {result.release_dir}; metrics {result.metrics}")
    return 0


def interrupted_message(args: argparse.Namespace, stop: KeyboardInterrupt) -> str:
    """One line for Ctrl-C: where training stopped and the command that resumes it from the newest checkpoint
    (the run folder's config.yaml holds every option of the run)."""
    from ..training import TrainingInterrupted

    if not isinstance(stop, TrainingInterrupted):
        return "interrupted before training began; nothing to resume"
    saved = Path(stop.output_dir) / "config.yaml"
    again = f"esp-medsam train --stage {args.stage} --config {saved}"
    if args.push_to_hub:
        again += f" --push-to-hub {args.push_to_hub}" + (" --also-main" if args.also_main else "")
    if stop.checkpoint is None or not saved.is_file():
        return f"interrupted at step {stop.step} ({stop.task}) before its first checkpoint; start again with: " \
               f"{again} --overwrite"
    return f"interrupted at step {stop.step} ({stop.task}); resume with: {again} --resume latest"


def publish(args: argparse.Namespace, config: TrainingConfig, result: StageResult) -> None:
    """Publish the stage's release folder (and optionally main) with the run's model card (``run_card``)."""
    from ..training.publishing import publish_stages, run_card

    card = dataclasses.replace(run_card(config, result), model_name=args.push_to_hub.split("/")[-1])
    branch = card.stage
    releases = [(branch, result.release_dir, card)]
    if args.also_main:
        releases.append(("main", result.release_dir, dataclasses.replace(card, stage="main")))
    commits = publish_stages(args.push_to_hub, releases)
    for name, commit in commits.items():
        print(f"{args.push_to_hub}@{name}: {commit}")
