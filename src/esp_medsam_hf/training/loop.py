"""The training loop, on Accelerate: one function that reads top to bottom, like accelerate's examples.

It runs on one CPU, one GPU, or many GPUs and nodes (``accelerate launch``), with mixed precision, gradient
accumulation, checkpoints written by ``save_state`` (atomically: a temporary folder renamed into place) and exact
resume (the batch order is seeded by epoch through accelerate's seedable sampler, RNG states come back with
``load_state``, consumed batches are skipped with ``skip_first_batches``). What differs between the stages (model,
data, loss, validation, which gradients to drop) is a ``StageTask``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fileio import replace_directory, staging_directory
from .config import TrainingConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing from that step was applied or saved."""


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
    """Where training stands; saved and restored with the accelerate state (``register_for_checkpointing``)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed
        self.global_step = 0  # optimizer steps
        self.best_metric: float | None = None
        self.best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


@dataclass
class TrainingResult:
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    global_step: int
    best_metric: float | None
    history: list[dict] = field(default_factory=list)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (``checkpoints/step-N``); temporary folders of interrupted saves are ignored."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
    return done[-1] if done else None


def save_model_atomically(task: StageTask, model: nn.Module, target: Path) -> Path:
    """``task.save`` into a temporary sibling folder, then rename it to ``target``."""
    with staging_directory(target) as staging:
        task.save(model, staging)
    return target


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step-N``, renamed to ``checkpoints/step-N`` when complete."""
    folder = output_dir / "checkpoints"
    target = folder / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = folder / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_directory(staging, target)
        done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))
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
        resume = latest_checkpoint(output_dir)
        if resume is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
    elif config.resume:
        resume = Path(config.resume)
        if not resume.is_dir():
            raise FileNotFoundError(f"checkpoint {resume} does not exist")
    started = output_dir.exists() and any(
        (output_dir / name).exists() for name in ("checkpoints", "final", "best", "log.jsonl")
    )
    if started and resume is None:
        if not config.overwrite:
            raise FileExistsError(
                f"{output_dir} already holds a run; pass --resume latest to continue it or --overwrite to replace it"
            )
        for name in ("checkpoints", "final", "best", "log.csv", "log.jsonl"):
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    return resume


def train(config: TrainingConfig, task: StageTask, output_dir: str | Path | None = None) -> TrainingResult:
    """Train ``task`` with ``config``; returns where the final and best models are. See the module docstring."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return _train(config, task, output_dir)
    finally:
        # accelerate keeps its settings in process-wide singletons; the next run (next stage or phase, possibly
        # with other mixed-precision or accumulation settings) starts from a clean state. The process group stays.
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _train(config: TrainingConfig, task: StageTask, output_dir: str | Path | None) -> TrainingResult:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    output_dir = Path(output_dir or config.output_dir)

    # 1. Accelerator: devices, processes, mixed precision, gradient accumulation. The learning rate decays once
    #    per epoch (the paper's schedule), so the scheduler is not stepped with the optimizer.
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
    resume = None
    if accelerator.is_main_process:
        resume = prepare_output_dir(config, output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(output_dir / "config.yaml")
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        resume = latest_checkpoint(output_dir) if config.resume == "latest" else (config.resume and Path(config.resume))
    run_log = RunLog(output_dir, accelerator.is_main_process)
    if config.report_to:
        accelerator.init_trackers(f"esp-medsam-{task.name}", config={k: str(v) for k, v in config.to_dict().items()})

    # 2. Data, optimizer (Adam on the trainable parameters only) and the per-epoch exponential decay.
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
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    # 3. Resume: parameters, optimizer, scheduler, RNG states and the progress counters.
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("%s: resumed from %s (epoch %d, batch %d, step %d)",
                    task.name, resume, progress.epoch, progress.batch, progress.global_step)

    steps_per_epoch = math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    bar = tqdm(total=total_steps, initial=min(progress.global_step, total_steps), desc=task.name, unit="step",
               disable=not (accelerator.is_local_main_process and config.progress), dynamic_ncols=True)
    best_dir = output_dir / "best"
    last_validated_step = None

    def validate_and_keep_best(epoch: int) -> None:
        nonlocal last_validated_step
        last_validated_step = progress.global_step
        if task.validate is None or not config.validate:
            return
        if accelerator.is_main_process:
            metrics = task.validate(accelerator.unwrap_model(model))
            value = float(metrics[task.metric_name])
            better = progress.best_metric is None or (
                value > progress.best_metric if task.greater_is_better else value < progress.best_metric
            )
            if better and math.isfinite(value):
                progress.best_metric, progress.best_step = value, progress.global_step
                save_model_atomically(task, accelerator.unwrap_model(model), best_dir)
            run_log.write({"event": "validation", "task": task.name, "epoch": epoch, "step": progress.global_step,
                           **metrics, "best": progress.best_metric})
            logger.info("%s: epoch %d step %d: validation %s %.4f (best %.4f at step %s)", task.name, epoch,
                        progress.global_step, task.metric_name, value, progress.best_metric, progress.best_step)
            accelerator.log({f"validation/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=progress.global_step)
        accelerator.wait_for_everyone()

    # 4. The loop.
    seen_modalities: set[int] = set()
    start = time.perf_counter()
    stop = progress.global_step >= total_steps
    for epoch in range(progress.epoch, config.epochs):
        if stop:
            break
        model.train()
        train_dataloader.set_epoch(epoch)
        if hasattr(task.train_dataset, "set_epoch"):
            task.train_dataset.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dataloader, progress.batch) if progress.batch else train_dataloader
        )
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.compute_loss(model, batch)
                # every process must agree before anything is applied: a bad loss on any of them stops all
                if not bool(torch.isfinite(accelerator.gather(loss.detach().float().reshape(1))).all()):
                    last = latest_checkpoint(output_dir)
                    raise NonFiniteLossError(
                        f"{task.name}: the loss is {loss.item()} at epoch {epoch}, step {progress.global_step + 1}; "
                        f"training stopped before applying it. Last good checkpoint: {last or 'none'}; "
                        f"best model: {best_dir if best_dir.exists() else 'none'}"
                    )
                accelerator.backward(loss)
                seen_modalities.update(int(m) for m in accelerator.gather(batch["modality"]).tolist())
                if accelerator.sync_gradients:
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    if task.before_optimizer_step is not None:
                        task.before_optimizer_step(accelerator.unwrap_model(model), seen_modalities)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch += 1
            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            seen_modalities = set()
            bar.update(1)
            lr = scheduler.get_last_lr()[0]
            if progress.global_step % config.log_every == 0 or progress.global_step == total_steps:
                value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", epoch=epoch)
                run_log.write({"event": "train", "time": round(time.perf_counter() - start, 3), "task": task.name,
                               "epoch": epoch, "step": progress.global_step, "loss": value, "lr": lr})
                accelerator.log({"train/loss": value, "train/lr": lr}, step=progress.global_step)
            if config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
                save_checkpoint(accelerator, output_dir, progress.global_step, config.keep_checkpoints)
            if progress.global_step >= total_steps:
                stop = True
                break
        else:
            # the epoch is complete: decay the learning rate, validate, keep the best model, checkpoint
            scheduler.step()
            progress.epoch, progress.batch = epoch + 1, 0
            validate_and_keep_best(epoch)
            save_checkpoint(accelerator, output_dir, progress.global_step, config.keep_checkpoints)
    bar.close()

    # 5. A stop inside an epoch (max_steps): validate and checkpoint there too, then save the final model.
    if last_validated_step != progress.global_step:
        validate_and_keep_best(progress.epoch)
        if latest_checkpoint(output_dir) is None or not latest_checkpoint(output_dir).name.endswith(
            f"{progress.global_step:08d}"
        ):
            save_checkpoint(accelerator, output_dir, progress.global_step, config.keep_checkpoints)
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        save_model_atomically(task, accelerator.unwrap_model(model), final_dir)
    accelerator.wait_for_everyone()
    if config.report_to:
        accelerator.end_training()
    logger.info("%s: done, %d optimizer steps in %.1f s; final model in %s", task.name, progress.global_step,
                time.perf_counter() - start, final_dir)
    return TrainingResult(
        output_dir=output_dir,
        final_dir=final_dir,
        best_dir=best_dir if best_dir.exists() else None,
        global_step=progress.global_step,
        best_metric=progress.best_metric,
        history=run_log.history,
    )
