"""The three training stages of ESP-MedSAM as ``StageTask``s for the loop, and ``run_stage`` to run one; each
stage reads top to bottom in its own module (``teacher``, ``distill``, ``espmedsam``).

- teacher: SAM's frozen ViT + medical tokens and MLPs + SPPG + QDMD on the source domains (mask and patch losses).
- distill (MMDKD): modality-common (the student's aggregator learns the frozen SAM encoder's embeddings on natural
  photographs, parameter bags unplugged) then modality-specific (bag m learns the medical teacher's embeddings on
  modality m, aggregator frozen; bags of modalities absent from a step get no gradient at all, so Adam leaves them
  alone). MSE on the embeddings.
- espmedsam: the distilled encoder with SPPG and QDMD on the source domains; the modality classifier trains jointly
  through the model's loss.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DistillConfig, EspMedSamStageConfig, TeacherConfig, TrainingConfig
from ..publishing import write_run_card
from ..run_folder import check_release_replaceable, check_run_folders
from .distill import EncoderDistillation, UnpluggedBags, distill_tasks, drop_absent_bag_gradients, run_distill
from .espmedsam import espmedsam_task, run_espmedsam, with_domains_target
from .modality_classifier import fit_modality_classifier
from .shared import StageResult
from .student import build_student
from .teacher import build_teacher, run_teacher, teacher_task


def run_stage(config: TrainingConfig) -> StageResult:
    """Run the stage that ``config`` describes (a TeacherConfig, DistillConfig or EspMedSamStageConfig); an existing
    ``release/`` and the run folders are checked first (``run_folder.check_release_replaceable``,
    ``check_run_folders``); the run's model card data are written
    to ``output_dir/card.json`` (``publishing.write_run_card``), which ``esp-medsam hub publish`` uses."""
    if isinstance(config, EspMedSamStageConfig):
        config = with_domains_target(config)  # the card and the run's config.yaml name the target domain.json gives
    check_release_replaceable(config)
    root = Path(config.output_dir)
    check_run_folders(config, [root / "common", root / "specific"] if isinstance(config, DistillConfig) else [root])
    if isinstance(config, TeacherConfig):
        result = run_teacher(config)
    elif isinstance(config, DistillConfig):
        result = run_distill(config)
    elif isinstance(config, EspMedSamStageConfig):
        result = run_espmedsam(config)
    else:
        raise TypeError(f"unknown stage configuration {type(config).__name__}")
    write_run_card(config, result)
    return result


__all__ = [
    "EncoderDistillation",
    "StageResult",
    "UnpluggedBags",
    "build_student",
    "build_teacher",
    "distill_tasks",
    "drop_absent_bag_gradients",
    "espmedsam_task",
    "fit_modality_classifier",
    "run_distill",
    "run_espmedsam",
    "run_stage",
    "run_teacher",
    "teacher_task",
]
