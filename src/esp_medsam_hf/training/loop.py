"""The training loop, on Accelerate: ``train`` reads top to bottom, like accelerate's examples, each of its steps
(accelerator and run folder, prepare, resume, one epoch, one optimizer step, validation, final save) a function below.

It runs on one CPU, one GPU, or many GPUs and nodes (``accelerate launch``), with mixed precision, gradient
accumulation, checkpoints written by ``save_state`` (atomically: a temporary folder renamed into place) and exact
resume (the batch order is seeded by epoch through accelerate's seedable sampler, RNG states come back with
``load_state``, consumed batches are skipped with ``skip_first_batches``). What differs between the stages (model,
data, loss, validation, which gradients to drop) is a ``StageTask``.
Validation and checkpoints come after every epoch (the paper's) or every ``eval_every`` steps or only at the end,
never twice at one step; ``early_stopping_patience`` stops a run whose validation stopped improving; Ctrl-C raises
``TrainingInterrupted`` (where it stopped and the newest checkpoint), with nothing half-written.

Checkpoints (and what one may be trusted with) are ``training.checkpoints``; the run folder's safety (no overwrite
unless asked, no resume with other options) is ``training.run_folder``; the log files are ``training.run_log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.esp_medsam.fileio import staging_directory
from .checkpoints import (
    PROGRESS_FILE,
    NonFiniteLossError,
    TrainingInterrupted,
    TrainingProgress,
    check_parameters_finite,
    checkpoint_name,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_moving_average,
    save_checkpoint,
)
from .config import TrainingConfig, resolve_mixed_precision
from .norms import hold_frozen_norm_statistics
from .run_folder import prepare_output_dir
from .run_log import RunLog

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


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
    prepare_batch(batch, epoch, index) -> batch: called on every batch before ``compute_loss`` with its epoch and
        index in the epoch (the same on resume), e.g. to add seeded prompts (``training.prompts``).
    find_unused_parameters: some trainable parameters get no gradient in some batches (distributed data parallel
        must then look for them).
    lr_scales: [(parameters, scale), ...]: parameters that train at ``scale`` times the learning rate (the schedule
        scales every group alike); the trainable parameters listed nowhere train at the learning rate.
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
    prepare_batch: Callable[[dict, int, int], dict] | None = None
    find_unused_parameters: bool = False
    lr_scales: list[tuple[list[nn.Parameter], float]] = field(default_factory=list)



@dataclass
class TrainingResult:
    output_dir: Path
    final_dir: Path
    best_dir: Path | None
    global_step: int
    best_metric: float | None
    history: list[dict] = field(default_factory=list)



def save_model_atomically(task: StageTask, model: nn.Module, target: Path) -> Path:
    """``task.save`` into a temporary sibling folder, then rename it to ``target`` (never a model with NaN/inf)."""
    check_parameters_finite(model, f"{task.name}: {target.name} model not saved")
    with staging_directory(target) as staging:
        task.save(model, staging)
    return target



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
    last_checkpoint_step: int | None = None
    ema: torch.optim.swa_utils.AveragedModel | None = None  # the weights' moving average (``ema_decay``)

    @property
    def best_dir(self) -> Path:
        return self.output_dir / "best"

    @property
    def stopped_early(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience is not None and self.progress.bad_validations >= patience

    @property
    def finished(self) -> bool:
        return self.progress.global_step >= self.total_steps or self.stopped_early

    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def evaluated_model(self) -> nn.Module:
        """What is validated and saved as ``best/`` and ``final/``: the weights' moving average with
        ``ema_decay``, else the trained model itself."""
        return self.ema.module if self.ema is not None else self.unwrapped_model()

    def save_checkpoint(self) -> None:
        """Checkpoint the current step, once: a step already saved (a periodic save that is also the end) is not
        saved again."""
        if self.last_checkpoint_step == self.progress.global_step:
            return
        save_checkpoint(self.accelerator, self.output_dir, self.progress.global_step, self.config.keep_checkpoints,
                        self.progress, self.unwrapped_model(), self.ema)
        self.last_checkpoint_step = self.progress.global_step

    def validate_and_checkpoint(self, epoch: int) -> None:
        """Validate (keeping the best model) and checkpoint the current step."""
        _validate_and_keep_best(self, epoch)
        self.save_checkpoint()


def train(config: TrainingConfig, task: StageTask, output_dir: str | Path | None = None) -> TrainingResult:
    """Train ``task`` with ``config``; returns where the final and best models are. See the module docstring."""
    from accelerate.state import AcceleratorState, GradientState
    from tqdm.auto import tqdm

    output_dir = Path(output_dir or config.output_dir)
    try:
        # 1. Accelerator (devices, processes, mixed precision, gradient accumulation) and the run folder.
        accelerator = _build_accelerator(config, output_dir, task.find_unused_parameters)
        resume = _prepare_run_folder(accelerator, config, output_dir)
        if config.report_to:
            accelerator.init_trackers(f"esp-medsam-{task.name}",
                                      config={k: str(v) for k, v in config.to_dict().items()})

        # 2. Data, optimizer (Adam on the trainable parameters) and the learning-rate schedule, through accelerate.
        run = _prepare_training(accelerator, config, task, output_dir)

        # 3. Resume: parameters, optimizer, scheduler, RNG states (all verified first) and the progress counters.
        if resume is not None:
            _resume(run, resume)

        # 4. The epochs: optimizer steps; validation, best model and checkpoint after every epoch or eval_every steps.
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
    except KeyboardInterrupt:
        # every file of a run is written atomically: what Ctrl-C stopped half-way is a temporary file or folder
        step = run.progress.global_step if "run" in locals() else 0
        raise TrainingInterrupted(task.name, step, output_dir, latest_checkpoint(output_dir)) from None
    finally:
        # accelerate keeps its settings in process-wide singletons; the next run (next stage or phase, possibly
        # with other mixed-precision or accumulation settings) starts from a clean state. The process group stays.
        # accelerate has no public way to reset them (transformers' TrainingArguments calls the same private method).
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _build_accelerator(config: TrainingConfig, output_dir: Path, find_unused_parameters: bool = False) -> Accelerator:
    """The accelerator of the run, refusing processes it did not join; seeds every RNG. The loop steps the
    learning-rate scheduler itself (after every epoch, ``_end_epoch``, or after every optimizer step,
    ``_after_optimizer_step``), so accelerate does not step it with the optimizer. ``find_unused_parameters``:
    distributed data parallel looks for parameters a batch leaves without gradient."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        log_with=list(config.report_to) or None,
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        dynamo_backend="inductor" if config.compile else None,  # None: what accelerate launch was given
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters
        else None,
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
    """Data loader, Adam on the trainable parameters only and the learning-rate schedule (``build_scheduler``),
    prepared by ``accelerator``; the number of optimizer steps the run will take."""
    train_dataloader = torch.utils.data.DataLoader(
        task.train_dataset, batch_size=config.batch_size, shuffle=True, collate_fn=task.collate_fn,
        num_workers=config.num_workers,
    )
    trainable = [p for p in task.model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{task.name}: the model has no trainable parameters")
    # Fused Adam (one kernel per step for all parameters) where it exists: on CUDA, with the model moved there first,
    # and on the CPU, where the per-parameter Adam was a quarter of the main job's stage-3 step (docs/training.md).
    fused = config.fused_optimizer and accelerator.device.type in ("cuda", "cpu")
    if fused:
        task.model.to(accelerator.device)
    optimizer = torch.optim.Adam(parameter_groups(task, trainable, config.learning_rate), lr=config.learning_rate,
                                 weight_decay=config.weight_decay, fused=True if fused else None)
    model, prepared_optimizer, train_dataloader = accelerator.prepare(task.model, optimizer, train_dataloader)
    total_steps = config.epochs * math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = accelerator.prepare(build_scheduler(config, optimizer, total_steps))
    optimizer = prepared_optimizer
    return _Run(config, task, output_dir, accelerator, model, optimizer, train_dataloader, scheduler, trainable,
                total_steps, RunLog(output_dir, accelerator.is_main_process),
                ema=moving_average(accelerator.unwrap_model(model), config.ema_decay))


def parameter_groups(task: StageTask, trainable: list[nn.Parameter], learning_rate: float) -> list[dict]:
    """Adam's non-empty parameter groups: the ``trainable`` parameters that ``task.lr_scales`` lists nowhere, then
    its entries' trainable ones at their scaled rates."""
    listed = {id(p) for parameters, _ in task.lr_scales for p in parameters}
    groups = [([p for p in trainable if id(p) not in listed], 1.0), *task.lr_scales]
    return [{"params": [p for p in params if p.requires_grad], "lr": learning_rate * scale}
            for params, scale in groups if any(p.requires_grad for p in params)]


def moving_average(model: nn.Module, decay: float | None) -> torch.optim.swa_utils.AveragedModel | None:
    """PyTorch's exponential moving average of ``model``'s parameters and buffers (``None`` without ``decay``);
    it copies the model, and starts from its weights at the first update."""
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def build_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``lr_schedule``: the paper's exponential decay (stepped after every epoch), or transformers'
    ``get_scheduler`` of that name over ``total_steps`` optimizer steps with ``warmup_steps`` of warmup (stepped
    after every optimizer step)."""
    if config.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    from transformers import get_scheduler

    return get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total_steps)


def _resume(run: _Run, checkpoint: Path) -> None:
    """Load the accelerate state of ``checkpoint`` (verified before) and its ``progress.json``; the logs lose the
    steps logged after it."""
    progress = run.progress
    run.accelerator.load_state(str(checkpoint))
    if run.ema is not None:
        load_moving_average(run.ema, checkpoint)
    progress.load_state_dict(json.loads((Path(checkpoint) / PROGRESS_FILE).read_text()))
    run.run_log.truncate_after(progress.global_step)
    run.last_checkpoint_step = progress.global_step
    if run.stopped_early:  # decided by the validation at this step
        run.last_validated_step = progress.global_step
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
        if run.task.prepare_batch is not None:
            batch = run.task.prepare_batch(batch, epoch, run.progress.batch)
        hold_frozen_norm_statistics(run.model)
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
    """Count the step and step a per-step schedule; log it every ``log_every`` steps (and the last one); validate
    every ``eval_every`` steps; checkpoint then and every ``checkpoint_every`` steps (at an epoch's last step,
    validated after the epoch: once, after it)."""
    progress, config, accelerator = run.progress, run.config, run.accelerator
    progress.global_step += 1
    run.seen_modalities = set()
    if run.ema is not None:
        run.ema.update_parameters(run.unwrapped_model())
    run.bar.update(1)
    lr = run.scheduler.get_last_lr()[0]  # the rate this step was taken with
    if config.lr_schedule != "exponential":
        run.scheduler.step()
    if progress.global_step % config.log_every == 0 or progress.global_step == run.total_steps:
        value = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        run.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", epoch=epoch)
        run.run_log.write({"event": "train", "time": round(time.perf_counter() - run.start, 3),
                           "task": run.task.name, "epoch": epoch, "step": progress.global_step, "loss": value,
                           "lr": lr})
        accelerator.log({"train/loss": value, "train/lr": lr}, step=progress.global_step)
    if isinstance(config.eval_every, int) and progress.global_step % config.eval_every == 0:
        run.validate_and_checkpoint(epoch)
    elif config.checkpoint_every and progress.global_step % config.checkpoint_every == 0:
        epoch_ends = config.eval_every == "epoch" and progress.batch >= len(run.dataloader)
        if not epoch_ends:
            run.save_checkpoint()


def _end_epoch(run: _Run, epoch: int) -> None:
    """A complete epoch: the exponential decay; with ``eval_every: epoch``, validate, keep the best, checkpoint."""
    if run.config.lr_schedule == "exponential":
        run.scheduler.step()
    run.progress.epoch, run.progress.batch = epoch + 1, 0
    if run.config.eval_every == "epoch":
        run.validate_and_checkpoint(epoch)


def _validate_and_keep_best(run: _Run, epoch: int) -> None:
    """Validate on the main process (when the task can and ``config.validate``), save ``best/`` when the metric
    improved, log it, count validations without improvement (``early_stopping_patience``); every process gets the
    main process's counters."""
    task, progress, accelerator = run.task, run.progress, run.accelerator
    run.last_validated_step = progress.global_step
    if task.validate is None or not run.config.validate:
        return
    if accelerator.is_main_process:
        metrics = task.validate(run.evaluated_model())
        value = float(metrics[task.metric_name])
        better = progress.best_metric is None or (
            value > progress.best_metric if task.greater_is_better else value < progress.best_metric
        )
        if better and math.isfinite(value):
            progress.best_metric, progress.best_step = value, progress.global_step
            progress.bad_validations = 0
            save_model_atomically(task, run.evaluated_model(), run.best_dir)
        else:
            progress.bad_validations += 1
        run.run_log.write({"event": "validation", "task": task.name, "epoch": epoch, "step": progress.global_step,
                           **metrics, "best": progress.best_metric})
        logger.info("%s: epoch %d step %d: validation %s %.4f (best %.4f at step %s)", task.name, epoch,
                    progress.global_step, task.metric_name, value, progress.best_metric, progress.best_step)
        accelerator.log({f"validation/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                        step=progress.global_step)
    _share_progress(progress)
    if run.stopped_early:
        logger.info("%s: early stopping at step %d: no better validation %s in %d validations (best %.4f at "
                    "step %s)", task.name, progress.global_step, task.metric_name, progress.bad_validations,
                    progress.best_metric, progress.best_step)


def _share_progress(progress: TrainingProgress) -> None:
    """The main process's validation counters on every process (which then agree on early stopping)."""
    from accelerate.utils import broadcast_object_list

    shared = [progress.best_metric, progress.best_step, progress.bad_validations]
    progress.best_metric, progress.best_step, progress.bad_validations = broadcast_object_list(shared)


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
        save_model_atomically(run.task, run.evaluated_model(), final_dir)
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
