"""Training of ESP-MedSAM's three stages (teacher, distillation, ESP-MedSAM) on Accelerate.

Entry points: ``accelerate launch scripts/train.py --stage teacher|distill|espmedsam ...`` (or ``esp-medsam train``),
``load_config`` for per-stage dataclass configs (YAML), ``run_stage`` to run one from Python, ``train`` for the loop.
"""

from .config import (
    STAGES,
    DistillConfig,
    EspMedSamStageConfig,
    TeacherConfig,
    TrainingConfig,
    load_config,
)
from .data import TrainingDataError
from .checkpoints import (
    CheckpointError,
    NonFiniteLossError,
    TrainingInterrupted,
    latest_checkpoint,
    latest_intact_checkpoint,
)
from .loop import StageTask, TrainingResult, train
from .stages import StageResult, run_distill, run_espmedsam, run_stage, run_teacher

__all__ = [
    "STAGES",
    "CheckpointError",
    "DistillConfig",
    "EspMedSamStageConfig",
    "NonFiniteLossError",
    "StageResult",
    "StageTask",
    "TeacherConfig",
    "TrainingConfig",
    "TrainingDataError",
    "TrainingInterrupted",
    "TrainingResult",
    "latest_checkpoint",
    "latest_intact_checkpoint",
    "load_config",
    "run_distill",
    "run_espmedsam",
    "run_stage",
    "run_teacher",
    "train",
]
