"""The training loop, on Accelerate: ``train`` reads top to bottom, like accelerate's examples, each of its steps
(accelerator and run folder, prepare, resume, one epoch, one optimizer step, validation, final save) a function below.

It runs on one CPU, one GPU, or many GPUs and nodes (``accelerate launch``), with mixed precision, gradient
accumulation, checkpoints written by ``save_state`` (atomically: a temporary folder renamed into place) and exact
resume (the batch order is seeded by epoch through accelerate's seedable sampler, RNG states come back with
``load_state``, consumed batches are skipped with ``skip_first_batches``). What differs between the stages (model,
data, loss, validation, which gradients to drop) is a ``StageTask``.

What a checkpoint may be trusted with: it is written only when every parameter is finite; the progress counters
are JSON (``progress.json``), so resuming never unpickles anything but accelerate's tensor files, which it reads
with ``weights_only=True`` (a ``custom_checkpoint_*.pkl`` in a checkpoint is refused); ``--resume latest`` takes the
newest checkpoint that verifies (weights readable and finite, RNG state and progress readable) and says which
broken ones it passed over; a resume with options that differ from the run's ``config.yaml`` is refused.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.esp_medsam.fileio import atomic_file, replace_directory, staging_directory
from .config import TrainingConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}(\d{{8}})")
PROGRESS_FILE = "progress.json"
# options that may differ between a run and its resumption (they do not change what is trained)
RESUMABLE_OPTIONS = frozenset({
    "output_dir", "resume", "overwrite", "progress", "num_workers", "report_to", "log_every", "checkpoint_every",
    "keep_checkpoints",
})


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients, or the parameters) became NaN or infinite; nothing from that step was applied
    or saved."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be trusted (unreadable, non-finite, tampered) or does not match the run's options."""


@dataclass
class StageTask:
    """What one training run needs besides the options.

    model: the module handed to ``accelerator.prepare`` (its forward must compute what ``compute_loss`` needs, so
        that distributed gradient synchronisation sees it).
    compute_loss(prepared_model, batch) -> scalar loss.
    validate(unwrapped_model) -> metrics dict holding ``metric_name``; None: no validation.
    save(unwrapped_model, folder): write a ``save_pretrained`` folder (model, processor).
    before_optimizer_step(unwrapped_model, modalities): called once gradients are final, with the set of
        modalities seen in the accumulated batches (on all processes); may drop gradients (set them to None).
    """

    name: str
    model: nn.Module
    train_dataset: torch.utils.data.Dataset
    collate_fn: Callable
    compute_loss: Callable[[nn.Module, dict], torch.Tensor]
    save: Callable[[nn.Module, Path], None]
    validate: Callable[[nn.Module], dict] | None = None
    metric_name: str = "dice"
    greater_is_better: bool = True
    before_optimizer_step: Callable[[nn.Module, set[int]], None] | None = None


class TrainingProgress:
    """Where training stands; saved as ``progress.json`` beside the accelerate state of each checkpoint."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed
        self.global_step = 0  # optimizer steps
        self.best_metric: float | None = None
        self.best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(vars(self))
        if not isinstance(state, dict) or set(state) != expected:
            raise CheckpointError(f"progress state must hold exactly {sorted(expected)}, got {state!r}")
        for key in ("epoch", "batch", "global_step"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise CheckpointError(f"progress {key} must be a non-negative integer, got {state[key]!r}")
        vars(self).update(state)


@dataclass
class TrainingResult:
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    global_step: int
    best_metric: float | None
    history: list[dict] = field(default_factory=list)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step ``step`` (``step-NNNNNNNN``)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (``checkpoints/step-NNNNNNNN``), oldest first; temporary folders of interrupted saves
    and folders of any other name (``step-zzz``) are not checkpoints."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_RE.fullmatch(p.name))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, unverified (see ``latest_intact_checkpoint``)."""
    done = checkpoints(output_dir)
    return done[-1] if done else None


def verify_checkpoint(folder: Path) -> None:
    """Raise ``CheckpointError`` unless ``folder`` is a checkpoint this loop wrote and can trust: no pickle to
    run, weights readable and finite, progress and RNG state readable (with ``weights_only``)."""
    from accelerate.utils import load as accelerate_load
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    planted = sorted(p.name for p in folder.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise CheckpointError(f"{folder} holds {', '.join(planted)}: pickled state that this training loop never "
                              "writes and will not load (loading it could run code); start from another checkpoint")
    try:
        TrainingProgress().load_state_dict(json.loads((folder / PROGRESS_FILE).read_text()))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: no readable {PROGRESS_FILE} ({error})") from error
    weights = sorted(folder.glob("model*.safetensors"))
    if not weights:
        raise CheckpointError(f"{folder}: no model*.safetensors")
    for path in weights:
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is unreadable ({error})") from error
        bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[0]})")
    for path in sorted(folder.glob("random_states_*.pkl")) + sorted(folder.glob("optimizer*.bin")):
        try:
            state = accelerate_load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(f"{path} cannot be read safely ({type(error).__name__}: {error})") from error
        if path.name.startswith("random_states"):
            _check_rng_state(path, state)


def _check_rng_state(path: Path, state: Any) -> None:
    """accelerate only logs (at INFO) an RNG state it cannot restore; a resume that is not exact must fail."""
    import random

    import numpy as np

    keys = ("random_state", "numpy_random_seed", "torch_manual_seed")
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise CheckpointError(f"{path}: not an RNG state (expected the keys {', '.join(keys)})")
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:  # restoring is the only full check of the values; the current states are put back right after
        random.setstate(state["random_state"])
        np.random.set_state(state["numpy_random_seed"])
        torch.set_rng_state(state["torch_manual_seed"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: the RNG state cannot be restored ({error})") from error
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def latest_intact_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint that passes ``verify_checkpoint``; each broken newer one is named in a warning."""
    for folder in reversed(checkpoints(output_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s; falling back to the previous one", folder.name, error)
            continue
        return folder
    return None


def check_parameters_finite(model: nn.Module, what: str) -> None:
    """Raise ``NonFiniteLossError`` naming the non-finite parameters (nothing is saved from such a model)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        total = sum(1 for _ in model.parameters())
        raise NonFiniteLossError(f"{what}: {len(bad)} of {total} parameters hold NaN or inf (e.g. {bad[0]})")


def save_model_atomically(task: StageTask, model: nn.Module, target: Path) -> Path:
    """``task.save`` into a temporary sibling folder, then rename it to ``target`` (never a model with NaN/inf)."""
    check_parameters_finite(model, f"{task.name}: {target.name} model not saved")
    with staging_directory(target) as staging:
        task.save(model, staging)
    return target


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, progress: TrainingProgress | None = None,
                    model: nn.Module | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step-N``, renamed to ``checkpoints/step-N`` when complete;
    only then are the checkpoints beyond the newest ``keep`` deleted.

    ``model``: checked finite first (a NaN model is never saved as a checkpoint); ``progress``: saved as JSON.
    accelerate's own rotation (``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)``) is not
    used: it deletes the oldest checkpoints before writing the new one, straight into its final folder, so a crash
    mid-save would leave fewer good checkpoints and a partial one under a checkpoint's name.
    """
    if model is not None:
        check_parameters_finite(model, f"step {step}: not saved as a checkpoint")
    folder = output_dir / "checkpoints"
    target = folder / checkpoint_name(step)
    staging = folder / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if progress is not None:
            (staging / PROGRESS_FILE).write_text(json.dumps(progress.state_dict()))
        replace_directory(staging, target)
        done = checkpoints(output_dir)
        for old in done[: max(0, len(done) - max(1, keep))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


class RunLog:
    """``log.csv`` (one row per logged optimizer step) and ``log.jsonl`` (every event, validation included)."""

    FIELDS = ("time", "task", "epoch", "step", "loss", "lr")

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path, self.jsonl_path = output_dir / "log.csv", output_dir / "log.jsonl"
        self.history: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Drop the events logged after ``step`` (by a run that went on past the checkpoint now resumed)."""
        if not self.enabled:
            return
        if self.jsonl_path.exists():
            lines = [line for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if int(json.loads(line).get("step", 0)) <= step]
            if len(kept) != len(lines):
                with atomic_file(self.jsonl_path) as temporary:
                    temporary.write_text("".join(line + "\n" for line in kept))
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            kept_rows = [row for row in rows if int(row["step"]) <= step]
            if len(kept_rows) != len(rows):
                with atomic_file(self.csv_path) as temporary, temporary.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(kept_rows)

    def write(self, event: dict) -> None:
        self.history.append(event)
        if not self.enabled:
            return
        with self.jsonl_path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
        if event.get("event") == "train":
            new = not self.csv_path.exists()
            with self.csv_path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.FIELDS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow(event)


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
    started = output_dir.exists() and any(
        (output_dir / name).exists() for name in ("checkpoints", "final", "best", "log.jsonl")
    )
    if started and resume is None:
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


RUN_ENTRIES = ("checkpoints", "final", "best", "log.csv", "log.jsonl")
"""What ``--overwrite`` removes from a run folder (nothing else in it is touched)."""
INPUT_OPTIONS = ("init_from", "teacher", "data", "natural_images", "sam_checkpoint")


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


@dataclass
class _Run:
    """What the steps of one ``train`` call share: the prepared objects, the counters, the logs."""

    config: TrainingConfig
    task: StageTask
    output_dir: Path
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    dataloader: torch.utils.data.DataLoader
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[nn.Parameter]
    total_steps: int
    run_log: RunLog
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    bar: Any = None  # the tqdm progress bar, made once the resumed step is known
    start: float = 0.0  # time.perf_counter() when the epochs begin (the log's time column counts from there)
    seen_modalities: set[int] = field(default_factory=set)  # by the batches accumulated into the next step
    last_validated_step: int | None = None

    @property
    def best_dir(self) -> Path:
        return self.output_dir / "best"

    @property
    def finished(self) -> bool:
        return self.progress.global_step >= self.total_steps

    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.accelerator, self.output_dir, self.progress.global_step,
                               self.config.keep_checkpoints, self.progress, self.unwrapped_model())


def train(config: TrainingConfig, task: StageTask, output_dir: str | Path | None = None) -> TrainingResult:
    """Train ``task`` with ``config``; returns where the final and best models are. See the module docstring."""
    from accelerate.state import AcceleratorState, GradientState
    from tqdm.auto import tqdm

    output_dir = Path(output_dir or config.output_dir)
    try:
        # 1. Accelerator (devices, processes, mixed precision, gradient accumulation) and the run folder.
        accelerator = _build_accelerator(config, output_dir)
        resume = _prepare_run_folder(accelerator, config, output_dir)
        if config.report_to:
            accelerator.init_trackers(f"esp-medsam-{task.name}",
                                      config={k: str(v) for k, v in config.to_dict().items()})

        # 2. Data, optimizer (Adam on the trainable parameters) and the per-epoch decay, through accelerate.
        run = _prepare_training(accelerator, config, task, output_dir)

        # 3. Resume: parameters, optimizer, scheduler, RNG states (all verified first) and the progress counters.
        if resume is not None:
            _resume(run, resume)

        # 4. The epochs: optimizer steps; a complete epoch ends with the decay, validation, best model, checkpoint.
        run.bar = tqdm(total=run.total_steps, initial=min(run.progress.global_step, run.total_steps), desc=task.name,
                       unit="step", disable=not (accelerator.is_local_main_process and config.progress),
                       dynamic_ncols=True)
        run.start = time.perf_counter()
        for epoch in range(run.progress.epoch, config.epochs):
            if run.finished or not _train_epoch(run, epoch):
                break
            _end_epoch(run, epoch)
        run.bar.close()

        # 5. A stop inside an epoch (max_steps) validates and checkpoints there too; then the final model.
        return _finish(run)
    finally:
        # accelerate keeps its settings in process-wide singletons; the next run (next stage or phase, possibly
        # with other mixed-precision or accumulation settings) starts from a clean state. The process group stays.
        # accelerate has no public way to reset them (transformers' TrainingArguments calls the same private method).
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _build_accelerator(config: TrainingConfig, output_dir: Path) -> Accelerator:
    """The accelerator of the run, refusing processes it did not join; seeds every RNG. The learning rate decays
    once per epoch (the paper's schedule), so the scheduler is not stepped with the optimizer."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        log_with=list(config.report_to) or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        dynamo_backend="inductor" if config.compile else None,  # None: what accelerate launch was given
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes} (they would train "
            "separately); on CPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
            "(see docs/training.md)"
        )
    set_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    return accelerator


def _prepare_run_folder(accelerator: Accelerator, config: TrainingConfig, output_dir: Path) -> Path | None:
    """The main process checks the run folder (``prepare_output_dir``) and writes ``config.yaml`` for a fresh run;
    returns the checkpoint to resume from, on every process."""
    resume = None
    if accelerator.is_main_process:
        resume = prepare_output_dir(config, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a resumed run keeps the config.yaml its checkpoints were trained with
            config.to_yaml(output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        resume = (latest_intact_checkpoint(output_dir) if config.resume == "latest"
                  else Path(config.resume) if config.resume else None)
    return resume


def _prepare_training(accelerator: Accelerator, config: TrainingConfig, task: StageTask, output_dir: Path) -> _Run:
    """Data loader, Adam on the trainable parameters only and the per-epoch exponential decay, prepared by
    ``accelerator``; the number of optimizer steps the run will take."""
    train_dataloader = torch.utils.data.DataLoader(
        task.train_dataset, batch_size=config.batch_size, shuffle=True, collate_fn=task.collate_fn,
        num_workers=config.num_workers,
    )
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{task.name}: the model has no trainable parameters")
    # Fused Adam (one kernel per step for all parameters) where it exists: on CUDA, with the model moved there first.
    fused = accelerator.device.type == "cuda"
    if fused:
        task.model.to(accelerator.device)
    optimizer = torch.optim.Adam(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True if fused else None
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(
        task.model, optimizer, train_dataloader, scheduler
    )
    total_steps = config.epochs * math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return _Run(config, task, output_dir, accelerator, model, optimizer, train_dataloader, scheduler, trainable,
                total_steps, RunLog(output_dir, accelerator.is_main_process))


def _resume(run: _Run, checkpoint: Path) -> None:
    """Load the accelerate state of ``checkpoint`` (verified before) and its ``progress.json``; the logs lose the
    steps logged after it."""
    progress = run.progress
    run.accelerator.load_state(str(checkpoint))
    progress.load_state_dict(json.loads((Path(checkpoint) / PROGRESS_FILE).read_text()))
    run.run_log.truncate_after(progress.global_step)
    logger.info("%s: resumed from %s (epoch %d, batch %d, step %d)",
                run.task.name, checkpoint, progress.epoch, progress.batch, progress.global_step)
    if run.finished:
        logger.info("%s: the resumed run is already complete (%d of %d steps); nothing to train",
                    run.task.name, progress.global_step, run.total_steps)


def _train_epoch(run: _Run, epoch: int) -> bool:
    """The batches of ``epoch`` not consumed yet; False when the run takes its last step inside the epoch (which
    is then not complete)."""
    run.model.train()
    run.dataloader.set_epoch(epoch)
    if hasattr(run.task.train_dataset, "set_epoch"):
        run.task.train_dataset.set_epoch(epoch)
    consumed = run.progress.batch
    batches = run.accelerator.skip_first_batches(run.dataloader, consumed) if consumed else run.dataloader
    for batch in batches:
        loss = _training_step(run, batch, epoch)
        run.progress.batch += 1
        if run.accelerator.sync_gradients:
            _after_optimizer_step(run, epoch, loss)
            if run.finished:
                return False
    return True


def _training_step(run: _Run, batch: dict, epoch: int) -> torch.Tensor:
    """Forward and backward on one batch, and the optimizer step once the gradients are accumulated; a loss or
    gradient norm that is not finite on any process stops training before anything is applied."""
    accelerator, task, config = run.accelerator, run.task, run.config
    with accelerator.accumulate(run.model):
        loss = task.compute_loss(run.model, batch)
        # every process must agree before anything is applied: a bad loss on any of them stops all
        if not bool(torch.isfinite(accelerator.gather(loss.detach().float().reshape(1))).all()):
            raise _non_finite(run, f"the loss is {loss.item()}", epoch)
        accelerator.backward(loss)
        run.seen_modalities.update(int(m) for m in accelerator.gather(batch["modality"]).tolist())
        if accelerator.sync_gradients:
            if config.max_grad_norm:
                norm = accelerator.clip_grad_norm_(run.trainable, config.max_grad_norm)
                if norm is not None and not bool(torch.isfinite(torch.as_tensor(norm))):
                    raise _non_finite(run, f"the gradient norm is {float(norm)}", epoch)
            if task.before_optimizer_step is not None:
                task.before_optimizer_step(run.unwrapped_model(), run.seen_modalities)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss


def _non_finite(run: _Run, what: str, epoch: int) -> NonFiniteLossError:
    """The error for a non-finite loss or gradient norm, naming the last good checkpoint and the best model."""
    best_dir = run.best_dir
    return NonFiniteLossError(
        f"{run.task.name}: {what} at epoch {epoch}, step {run.progress.global_step + 1}; training stopped before "
        f"applying it. Last good checkpoint: {latest_intact_checkpoint(run.output_dir) or 'none'}; "
        f"best model: {best_dir if best_dir.exists() else 'none'}"
    )


def _after_optimizer_step(run: _Run, epoch: int, loss: torch.Tensor) -> None:
    """Count the step; log it every ``log_every`` steps (and the last one); checkpoint every ``checkpoint_every``."""
    progress, config, accelerator = run.progress, run.config, run.accelerator
    progress.global_step += 1
    run.seen_modalities = set()
    run.bar.update(1)
    if progress.global_step % config.log_every == 0 or progress.global_step == run.total_steps:
        lr = run.scheduler.get_last_lr()[0]
        value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        run.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        run.run_log.write({"event": "train", "time": round(time.perf_counter() - run.start, 3),
                           "task": run.task.name, "epoch": epoch, "step": progress.global_step, "loss": value,
                           "lr": lr})
        accelerator.log({"train/loss": value, "train/lr": lr}, step=progress.global_step)
    if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
        run.save_checkpoint()


def _end_epoch(run: _Run, epoch: int) -> None:
    """A complete epoch: decay the learning rate, validate, keep the best model, checkpoint."""
    run.scheduler.step()
    run.progress.epoch, run.progress.batch = epoch + 1, 0
    _validate_and_keep_best(run, epoch)
    run.save_checkpoint()


def _validate_and_keep_best(run: _Run, epoch: int) -> None:
    """Validate on the main process (when the task can and ``config.validate``), save ``best/`` when the metric
    improved, log it; the other processes wait."""
    task, progress, accelerator = run.task, run.progress, run.accelerator
    run.last_validated_step = progress.global_step
    if task.validate is None or not run.config.validate:
        return
    if accelerator.is_main_process:
        metrics = task.validate(run.unwrapped_model())
        value = float(metrics[task.metric_name])
        better = progress.best_metric is None or (
            value > progress.best_metric if task.greater_is_better else value < progress.best_metric
        )
        if better and math.isfinite(value):
            progress.best_metric, progress.best_step = value, progress.global_step
            save_model_atomically(task, run.unwrapped_model(), run.best_dir)
        run.run_log.write({"event": "validation", "task": task.name, "epoch": epoch, "step": progress.global_step,
                           **metrics, "best": progress.best_metric})
        logger.info("%s: epoch %d step %d: validation %s %.4f (best %.4f at step %s)", task.name, epoch,
                    progress.global_step, task.metric_name, value, progress.best_metric, progress.best_step)
        accelerator.log({f"validation/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=progress.global_step)
    accelerator.wait_for_everyone()


def _finish(run: _Run) -> TrainingResult:
    """Validate and checkpoint where the run stopped unless its last epoch did; save ``final/``; end the trackers."""
    progress, accelerator = run.progress, run.accelerator
    if run.last_validated_step != progress.global_step:
        _validate_and_keep_best(run, progress.epoch)
        latest = latest_checkpoint(run.output_dir)
        if latest is None or latest.name != checkpoint_name(progress.global_step):
            run.save_checkpoint()
    final_dir = run.output_dir / "final"
    if accelerator.is_main_process:
        save_model_atomically(run.task, run.unwrapped_model(), final_dir)
    accelerator.wait_for_everyone()
    if run.config.report_to:
        accelerator.end_training()
    logger.info("%s: done, %d optimizer steps in %.1f s; final model in %s", run.task.name, progress.global_step,
                time.perf_counter() - run.start, final_dir)
    return TrainingResult(
        output_dir=run.output_dir,
        final_dir=final_dir,
        best_dir=run.best_dir if run.best_dir.exists() else None,
        global_step=progress.global_step,
        best_metric=progress.best_metric,
        history=run.run_log.history,
    )
