"""Run-folder safety: a run folder is never overwritten unless asked, an ``--overwrite`` never deletes the run's
own inputs, and a resume with options that differ from the run's ``config.yaml`` is refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .checkpoints import CheckpointError, checkpoints, latest_intact_checkpoint, verify_checkpoint
from .config import RELEASE, TrainingConfig

logger = logging.getLogger(__name__)

# options that may differ between a run and its resumption (they do not change what is trained)
RESUMABLE_OPTIONS = frozenset({
    "output_dir", "resume", "overwrite", "progress", "num_workers", "report_to", "log_every", "checkpoint_every",
    "keep_checkpoints",
})


def prepare_output_dir(config: TrainingConfig, output_dir: Path) -> Path | None:
    """Refuse to overwrite a finished or started run unless asked; returns the checkpoint to resume from."""
    resume = None
    if config.resume == "latest":
        resume = latest_intact_checkpoint(output_dir)
        if resume is None:
            if checkpoints(output_dir):
                raise CheckpointError(f"no checkpoint in {output_dir / 'checkpoints'} can be trusted (see the "
                                      "warnings above); pass --overwrite without --resume to start again")
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
    elif config.resume:
        resume = Path(config.resume)
        if not resume.is_dir():
            raise FileNotFoundError(f"checkpoint {resume} does not exist")
        verify_checkpoint(resume)
    if resume is not None:
        check_resume_options(config, output_dir)
    if holds_run(output_dir) and resume is None:
        if not config.overwrite:
            raise FileExistsError(
                f"{output_dir} already holds a run; pass --resume latest to continue it or --overwrite to replace it"
            )
        check_inputs_survive(config, [output_dir / name for name in RUN_ENTRIES])
        for name in RUN_ENTRIES:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return resume


def holds_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a started or finished run."""
    return output_dir.exists() and any(
        (output_dir / name).exists() for name in ("checkpoints", "final", "best", "log.jsonl")
    )


def check_run_folders(config: TrainingConfig, folders: list[Path]) -> None:
    """``prepare_output_dir``'s refusals for the run folders of a stage, before any data is loaded or model built:
    a folder holding a run needs ``--resume`` (with the run's options) or ``--overwrite`` (sparing the run's
    inputs); a ``--resume`` checkpoint folder must exist. Nothing is deleted or written here."""
    if config.resume and config.resume != "latest" and not Path(config.resume).is_dir():
        raise FileNotFoundError(f"checkpoint {config.resume} does not exist")
    for folder in folders:
        if not holds_run(folder):
            continue
        if config.resume:
            check_resume_options(config, folder)
        elif not config.overwrite:
            raise FileExistsError(
                f"{folder} already holds a run; pass --resume latest to continue it or --overwrite to replace it"
            )
        else:
            check_inputs_survive(config, [folder / name for name in RUN_ENTRIES])


RUN_ENTRIES = ("checkpoints", "final", "best", "log.csv", "log.jsonl")
"""What ``--overwrite`` removes from a run folder (nothing else in it is touched)."""
INPUT_OPTIONS = ("init_from", "teacher", "data", "natural_images", "sam_checkpoint")


def check_release_replaceable(config: TrainingConfig) -> None:
    """The stage's ``release/`` follows the run folder's ``--overwrite`` rule, checked before any training: an
    existing one (a model the user may have put or kept there) is replaced only with ``--overwrite`` or by the
    resumed run that wrote it, and never when it holds one of the run's inputs (``--init-from run/release``)."""
    release = Path(config.output_dir) / RELEASE
    if not release.exists():
        return
    check_inputs_survive(config, [release])
    if not config.overwrite and not config.resume:
        raise FileExistsError(f"{release} already exists; pass --overwrite to replace it (or --resume latest to "
                              "finish the run that wrote it)")


def check_inputs_survive(config: TrainingConfig, doomed: list[Path]) -> None:
    """Refuse an ``--overwrite`` that would delete one of the run's own inputs (``init_from: run/final``, ...)."""
    for option in INPUT_OPTIONS:
        value = getattr(config, option, None)
        if not value or value in ("synthetic", "litemedsam"):
            continue
        source = Path(value).resolve()
        for path in doomed:
            target = path.resolve()
            if source == target or target in source.parents:
                raise FileExistsError(
                    f"--overwrite would delete {path}, which holds {option} ({value}); choose another output folder"
                )


def check_resume_options(config: TrainingConfig, output_dir: Path) -> None:
    """Refuse to resume with options that change what is trained (the checkpoint was made under the saved ones)."""
    import yaml

    path = output_dir / "config.yaml"
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    current = config.to_dict()
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_OPTIONS and saved.get(k) != current.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"cannot resume {output_dir} with other options ({details}); its checkpoints were trained with "
            f"{path.name}. Resume with the same options, or start a new run (another --output-dir, or "
            "--init-from the previous run's final model)"
        )

