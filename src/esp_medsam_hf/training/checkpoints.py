"""Checkpoints of the training loop: written by ``save_state`` (atomically: a temporary folder renamed into place),
found, and verified before a resume.

What a checkpoint may be trusted with: it is written only when every parameter is finite; the progress counters
are JSON (``progress.json``), so resuming never unpickles anything but accelerate's tensor files, which it reads
with ``weights_only=True`` (a ``custom_checkpoint_*.pkl`` in a checkpoint is refused); ``--resume latest`` takes the
newest checkpoint that verifies (weights readable and finite, RNG state and progress readable) and says which
broken ones it passed over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.esp_medsam.fileio import replace_directory

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_RE = re.compile(rf"{CHECKPOINT_PREFIX}(\d{{8}})")
PROGRESS_FILE = "progress.json"
EMA_FILE = "ema.safetensors"
"""The moving average of the weights (``ema_decay``) in a checkpoint: its state dict, safetensors (never a pickle)."""
MANIFEST_FILE = "manifest.json"
"""The sha256 of every other file of a checkpoint, written last: a file changed, added or removed afterwards (a
tampered ``scheduler.bin``) makes the checkpoint untrusted, and the loop falls back to the previous one."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradients, or the parameters) became NaN or infinite; nothing from that step was applied
    or saved."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be trusted (unreadable, non-finite, tampered) or does not match the run's options."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped training ``task`` after optimizer step ``step``; ``checkpoint`` is the newest complete
    checkpoint in ``output_dir`` (None: none yet). Nothing is left half-written: every file of a run is written to
    a temporary name first."""

    def __init__(self, task: str, step: int, output_dir: Path, checkpoint: Path | None):
        super().__init__(f"{task}: interrupted at step {step}")
        self.task, self.step, self.output_dir, self.checkpoint = task, step, Path(output_dir), checkpoint



class TrainingProgress:
    """Where training stands; saved as ``progress.json`` beside the accelerate state of each checkpoint."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0  # batches of the current epoch already consumed
        self.global_step = 0  # optimizer steps
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0  # validations in a row without a better metric (early stopping)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(vars(self))
        if isinstance(state, dict) and "bad_validations" not in state:  # written before early stopping existed
            state = {**state, "bad_validations": 0}
        if not isinstance(state, dict) or set(state) != expected:
            raise CheckpointError(f"progress state must hold exactly {sorted(expected)}, got {state!r}")
        for key in ("epoch", "batch", "global_step", "bad_validations"):
            if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
                raise CheckpointError(f"progress {key} must be a non-negative integer, got {state[key]!r}")
        vars(self).update(state)



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
    run, weights readable and finite, progress, RNG, optimizer and scheduler state readable (with
    ``weights_only``), and every file the one the manifest recorded when it was saved (``check_manifest``)."""
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
    for path in weights + sorted(folder.glob(EMA_FILE)):
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is unreadable ({error})") from error
        bad = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[0]})")
    for path in sorted(folder.glob("random_states_*.pkl")) + sorted(folder.glob("*.bin")):  # optimizer, scheduler...
        try:
            state = accelerate_load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
            raise CheckpointError(f"{path} cannot be read safely ({type(error).__name__}: {error})") from error
        if path.name.startswith("random_states"):
            _check_rng_state(path, state)
    check_manifest(folder)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}


def write_manifest(folder: Path) -> None:
    """``MANIFEST_FILE``: the sha256 of every file of the finished checkpoint ``folder``; written last."""
    hashes = {name: _sha256(folder / name) for name in sorted(_checkpoint_files(folder))}
    (folder / MANIFEST_FILE).write_text(json.dumps({"sha256": hashes}, indent=1))


def check_manifest(folder: Path) -> None:
    """Raise ``CheckpointError`` unless every file of ``folder`` is the one its manifest recorded (none changed,
    added or removed since the checkpoint was saved)."""
    try:
        recorded = json.loads((folder / MANIFEST_FILE).read_text())["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError("sha256 is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder}: no readable {MANIFEST_FILE} ({error}); it is written last, so the "
                              "checkpoint is incomplete, from an older version, or altered") from error
    present = _checkpoint_files(folder)
    if set(recorded) != present:
        changed = sorted(set(recorded) ^ present)
        raise CheckpointError(f"{folder}: files added or removed since it was saved ({', '.join(changed[:5])})")
    for name, digest in sorted(recorded.items()):
        if _sha256(folder / name) != digest:
            raise CheckpointError(f"{folder / name} is not the file saved with this checkpoint (its sha256 differs "
                                  f"from {MANIFEST_FILE}): altered or corrupted")


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



def load_moving_average(ema: nn.Module, checkpoint: Path) -> None:
    """The moving average saved in ``checkpoint`` (``EMA_FILE``) into ``ema``; a checkpoint without one (written
    without ``ema_decay``) is a ``CheckpointError``."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / EMA_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} holds no {EMA_FILE}: it was saved without ema_decay; resume it without "
                              "ema_decay or start a new run")
    ema.load_state_dict(load_file(path))


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, progress: TrainingProgress | None = None,
                    model: nn.Module | None = None, ema: nn.Module | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoints/.tmp-step-N``, renamed to ``checkpoints/step-N`` when complete;
    only then are the checkpoints beyond the newest ``keep`` deleted.

    ``model``: checked finite first (a NaN model is never saved as a checkpoint); ``progress``: saved as JSON;
    ``ema``: the weights' moving average (``torch.optim.swa_utils.AveragedModel``), saved as ``EMA_FILE``.
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
        if ema is not None:
            from safetensors.torch import save_file

            save_file({name: tensor.detach().contiguous() for name, tensor in ema.state_dict().items()},
                      staging / EMA_FILE)
        write_manifest(staging)
        replace_directory(staging, target)
        done = checkpoints(output_dir)
        for old in done[: max(0, len(done) - max(1, keep))]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target

