"""Per-stage training configurations as dataclasses, with the paper's defaults, loadable from YAML.

Paper (arXiv 2407.14153, section 4.2): Adam, exponential learning-rate decay with factor 0.98 per epoch, batch 4,
200 epochs, 1024x1024 images, lambda = 0.7 for the focal/dice mix; the learning rate is not printed, 1e-4 is the
usual choice for SAM fine-tuning.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

STAGES = ("teacher", "distill", "espmedsam")
LR_SCHEDULES = ("exponential", "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                "polynomial", "inverse_sqrt")
"""``lr_schedule`` values: the paper's per-epoch ``exponential`` decay, or a schedule of ``transformers.get_scheduler``
(the ones that need no other argument), stepped after every optimizer step."""


def resolve_mixed_precision(value: str) -> str:
    """``value``, with ``"auto"`` made ``"bf16"`` where the device training runs on computes bfloat16 natively (a CUDA
    GPU that supports it; a CPU with AVX512-BF16 or AMX, where bf16 autocast cut the main job's stage-3 step by about
    30 % and its encoding by 40 %, docs/training.md) and ``"no"`` elsewhere (a CPU without them emulates bf16, slower
    than fp32)."""
    if value != "auto":
        return value
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "no"
RELEASE = "release"
"""The folder of a stage run that is published (``<output_dir>/release``), the same name for every stage; the next
stage's input defaults to the previous stage's default ``release`` folder."""

KEEP_OTHERS_WEIGHT = 10.0
"""``keep_others_weight`` when a new target trains with the shared parts and none is given. Measured on the optic-disc
example (``--train-all --learning-rate 1e-4``, 24 steps, the 642ce3b release): without the term disc Dice 87.82 on
the 2 test photographs, vessels 76.23 -> 0.04, nuclei 94.04 -> 90.35; with 10: disc 93.34, vessels 76.23 -> 70.24,
nuclei 94.04 -> 93.76 (docs/training.md)."""

SHARED_LR_SCALE = 0.003
"""``shared_lr_scale`` when a new target trains with the shared parts and none is given: the shared encoder and
decoder at 0.003 times the new target's learning rate. Measured on the optic-disc example (``--train-all``, learning
rate 1e-3, 24 steps, ``keep_others_weight`` 10, the 7438f51 release; docs/training.md): 0.003 gave disc Dice 90.42
on the 2 test photographs, vessels 71.80 -> 71.60, nuclei 94.74 -> 94.75; 0.01 gave 84.03, 72.26, 94.66; every part
at 1e-4 (the 58cff0d release, the same recipe) gave 81.12, 65.66, 94.08."""


@dataclass
class TrainingConfig:
    """Options shared by the three stages (one ``accelerate launch scripts/train.py --stage ...`` run each).

    output_dir: run folder: ``checkpoints/`` (accelerate states), ``best/`` and ``final/`` (save_pretrained
        folders), ``log.csv`` / ``log.jsonl`` and ``config.yaml``.
    data: ``"synthetic"`` (generated on the fly) or a folder written by ``esp-medsam prepare``.
    domains: training domains (default: the six source domains; unseen domains are never trained on).
    model_size: ``"official"`` (1024 px architecture) or ``"tiny"`` (the small test/demo configuration).
    max_steps: stop after this many optimizer steps (for short runs); None = ``epochs`` full epochs.
    mixed_precision: ``no``, ``fp16``, ``bf16`` (accelerate's autocast), or ``auto``: bf16 where the hardware computes
        it natively (:func:`resolve_mixed_precision`), else no. Feature caching encodes under the same precision.
    compile: ``torch.compile`` the model for training (accelerate's inductor backend); worth it on GPUs.
    fused_optimizer: Adam's fused implementation (one kernel per step for all parameters) where the device has one
        (CPU, CUDA); False: the per-parameter implementation, as training ran before (``scripts/benchmark_stage3.py``'s
        baseline).
    checkpoint_every: also save an accelerate state every N optimizer steps (0: only at the end of each epoch).
    eval_every: when to validate, keep the best model and checkpoint: ``"epoch"`` (after every epoch, the paper's
        and the default), every N optimizer steps, or ``"end"`` (also ``0``: once, where the run stops); never twice
        at one step. With a few images an epoch is a step or two, so ``"epoch"`` validates far too often.
    early_stopping_patience: stop after this many validations in a row without a better metric (None: never).
    lr_schedule: ``"exponential"`` (the paper's: times ``lr_decay`` after every epoch) or a transformers schedule
        stepped with the optimizer (:data:`LR_SCHEDULES`, ``transformers.get_scheduler``) over the run's steps,
        after ``warmup_steps`` of linear warmup.
    resume: ``"latest"`` (the newest complete checkpoint in ``output_dir``), a checkpoint folder, or None.
    threads: torch's CPU threads for this run (None: torch's choice).
    freeze: parts of an ESP-MedSAM model kept frozen (:data:`FREEZABLE`; stages 1 and 3 with an ESP-MedSAM model).
    frozen_encoder_stages: the encoder's first N stages stay frozen (1: the stem, patch embedding and MBConv stage
        0, which no parameter bag touches; 2-4: also TinyViT stages 1-3 with their bags; 0: none).
    cache_features: with the encoder frozen (``freeze: [encoder]``) or its first stages (``frozen_encoder_stages``),
        encode every training image once per view (``feature_views``: 1-4 of identity, horizontal flip, vertical
        flip, 180 degree rotation) up to there and train the rest on the stored features; with ``zoom``, the views
        are that many zoom crops per image (:mod:`esp_medsam_hf.training.augment`).
    zoom: ``{domain: {object_size: [low, high]}}`` (object diameters in input pixels, measured from the masks) or
        ``{domain: {scale: [low, high]}}`` (input pixels per native pixel): training sees crops of that domain's
        native-resolution images at a log-uniform random zoom in that range; other domains: whole images, flips.
        ``crops: N`` beside the range: every epoch shows N crops of each of that domain's images.
    photometric: random gamma, contrast, blur and noise on every training view, and a halo of light beside the
        objects on half the object-size domains' views (:class:`~esp_medsam_hf.training.augment.Halo`).
    ema_decay: validate and save (``best/``, ``final/``) an exponential moving average of the weights, updated
        after every optimizer step with this decay (PyTorch's ``AveragedModel``; 0.95 averages over about the last
        20 steps), instead of the weights of the last step; checkpoints carry it, so a resume is exact. None: off.
    """

    stage: ClassVar[str] = ""
    output_dir: str = "outputs/train"
    data: str = "synthetic"
    domains: list[str] | None = None
    synthetic_train_images: int = 64
    synthetic_valid_images: int = 8
    model_size: str = "official"
    image_size: int = 1024
    epochs: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-4
    lr_decay: float = 0.98
    weight_decay: float = 0.0
    focal_loss_weight: float = 0.7
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    compile: bool = False
    fused_optimizer: bool = True
    max_steps: int | None = None
    seed: int = 0
    augment: bool = True
    num_workers: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int | str = "epoch"
    early_stopping_patience: int | None = None
    lr_schedule: str = "exponential"
    warmup_steps: int = 0
    resume: str | None = None
    validate: bool = True
    validation_images: int | None = None
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None
    freeze: list[str] = field(default_factory=list)
    frozen_encoder_stages: int = 0
    cache_features: bool = False
    feature_views: int = 2
    zoom: dict[str, dict[str, list[float] | int]] | None = None
    photometric: bool = False
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.model_size not in ("official", "tiny"):
            raise ValueError(f"model_size must be 'official' or 'tiny', got {self.model_size!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16", "auto"):
            raise ValueError(f"mixed_precision must be no, fp16, bf16 or auto, got {self.mixed_precision!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_freeze(self.freeze)
        if isinstance(self.frozen_encoder_stages, bool) or not isinstance(self.frozen_encoder_stages, int) or not (
            0 <= self.frozen_encoder_stages <= 4
        ):
            raise ValueError(f"frozen_encoder_stages must be an integer in 0..4, got {self.frozen_encoder_stages!r}")
        if self.cache_features and "encoder" not in expand_freeze(self.freeze) and not self.frozen_encoder_stages:
            raise ValueError("cache_features needs the encoder frozen: add 'encoder' to freeze, or freeze its first "
                             "stages with frozen_encoder_stages")
        from .augment import parse_zoom

        parse_zoom(self.zoom)
        if isinstance(self.feature_views, bool) or not isinstance(self.feature_views, int) or not (
            1 <= self.feature_views <= (4 if not self.zoom else 1024)
        ):
            raise ValueError(f"feature_views must be in 1..4 (1..1024 with zoom), got {self.feature_views!r}")
        self._check_numbers()
        self._check_schedule()

    def _check_schedule(self) -> None:
        """``eval_every``, ``early_stopping_patience``, ``lr_schedule`` and ``warmup_steps``."""
        if self.eval_every == 0:
            self.eval_every = "end"
        if self.eval_every not in ("epoch", "end") and (
            isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1
        ):
            raise ValueError(f"eval_every must be 'epoch', 'end' (or 0) or a number of steps >= 1, "
                             f"got {self.eval_every!r}")
        patience = self.early_stopping_patience
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"early_stopping_patience must be an integer >= 1, got {patience!r}")
        if patience is not None and not self.validate:
            raise ValueError("early_stopping_patience needs validation (validate: true)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps and self.lr_schedule == "exponential":
            raise ValueError("warmup_steps needs a step schedule: give lr_schedule (e.g. cosine), not exponential")
        check_trackers(self.report_to)

    def _check_numbers(self) -> None:
        """Every option is checked before anything is touched (a bad one must not cost the previous run)."""
        def finite(name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
                (low < value if low_open else low <= value) and value <= high
            ):
                bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")

        finite("learning_rate", 0, low_open=True)
        finite("weight_decay", 0)
        finite("focal_loss_weight", 0, 1)
        if self.max_grad_norm is not None:
            finite("max_grad_norm", 0, low_open=True)
        if self.ema_decay is not None:
            finite("ema_decay", 0, 1)
            if self.ema_decay == 1:
                raise ValueError("ema_decay must be below 1 (1 would keep the initial weights)")
        for name in ("num_workers", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def cache_point(self) -> int | None:
        """Where a feature cache stops: None (the whole encoder, when it is frozen) or frozen encoder stages."""
        return None if "encoder" in expand_freeze(self.freeze) else self.frozen_encoder_stages

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **dataclasses.asdict(self)}

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        """Build from plain data; unknown keys are an error that names them."""
        data = {k: v for k, v in data.items() if k != "stage"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.stage or 'training'} option(s) {unknown}; expected some of {sorted(known)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return cls(**{name: _coerce(name, value, types[name]) for name, value in data.items()})


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string: numbers given as strings become numbers where the option is
    numeric; anything else of the wrong type is an error naming the option."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    if "float" in kinds and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if "int" in kinds and not isinstance(value, bool):
        if "str" in kinds and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kinds == ["bool"] and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass
class TeacherConfig(TrainingConfig):
    """Stage 1: SAM's frozen ViT encoder with medical tokens and MLPs, plus SPPG and QDMD, on the source domains.

    sam_checkpoint: SAM weights to start from (``facebook/sam-vit-b|l|huge`` or a local SamModel folder); None builds
        the encoder from ``sam_preset`` with random weights (only useful for tests).
    init_from: ``"litemedsam"`` (or a saved ESP-MedSAM folder): the teacher is then an ESP-MedSAM model on
        LiteMedSAM's real encoder instead of a SAM ViT, for machines where no SAM weights can be had (the demo).
    """

    stage: ClassVar[str] = "teacher"
    output_dir: str = "outputs/teacher"
    sam_preset: str = "vit-b"
    sam_checkpoint: str | None = None
    num_medical_tokens: int = 4
    init_from: str | None = None


@dataclass
class DistillConfig(TrainingConfig):
    """Stage 2 (MMDKD): modality-common then modality-specific distillation into the student's encoder.

    teacher: the stage-1 teacher folder (save_pretrained; default: stage 1's default ``release`` folder). Its SAM
        encoder alone is the modality-common target, with the medical tokens and MLPs the modality-specific target.
    natural_images: folder of photographs (or a ``save_to_disk`` dataset with an ``image`` column) for the
        modality-common phase; None: the natural photographs scikit-image ships.
    common_epochs / specific_epochs: epochs of the two phases (None: ``epochs`` each); ``common_max_steps: 0``
        skips the modality-common phase (for a student whose aggregator is already distilled, like LiteMedSAM's).
    init_from: initial student (a saved EspMedSamModel folder, or ``"litemedsam"``); None: random.
    intensity_augment: in the modality-specific phase the student sees the image with random gamma, contrast,
        brightness, colour balance and noise, the teacher the image itself: the bags learn embeddings that do
        not move with the intensity shifts between hospitals and scanners.
    """

    stage: ClassVar[str] = "distill"
    output_dir: str = "outputs/distill"
    teacher: str = f"{TeacherConfig.output_dir}/{RELEASE}"
    natural_images: str | None = None
    common_epochs: int | None = None
    specific_epochs: int | None = None
    common_max_steps: int | None = None
    specific_max_steps: int | None = None
    natural_repeats: int = 8
    init_from: str | None = None
    intensity_augment: bool = False


@dataclass
class EspMedSamStageConfig(TrainingConfig):
    """Stage 3: the distilled encoder with SPPG and QDMD on the source domains (the modality classifier trains
    jointly through the model's loss).

    init_from: the stage-2 folder (default: stage 2's default ``release`` folder), ``"litemedsam"`` (LiteMedSAM
        weights through the converter), or None (random).
    classifier_domains: after training, fit the modality classifier alone (encoder frozen) on the train splits of
        these domains, e.g. all 12; the classifier reads detached stage-0 features, so segmentation is unchanged.
    classifier_epochs: epochs of that fit.
    new_target / target_modality: add a target named ``new_target`` to modality ``target_modality`` (its own
        parameter bag and mask query, initialised from the modality's own target; kept if ``init_from`` has it) and
        train on the domains as that target.
    new_modality / like_modality / new_modality_target: add a modality named ``new_modality`` (its own parameter
        bag, mask query and classifier class, initialised from ``like_modality``'s; its target named
        ``new_modality_target``, default ``new_modality``; kept if ``init_from`` has it) and train on the domains as
        that modality (``training.modalities``).
    only_new_target: with ``new_target`` (or ``new_modality``), train only the new target's (modality's) bag and
        query (the default), so every other target of the model stays bit-identical; False trains what ``freeze``
        leaves.
    keep_others_weight: with ``only_new_target`` False, the weight of a learning-without-forgetting term that keeps
        the modality's own target's masks on the training images at the starting model's
        (``training.targets.TargetTraining``; a new target's or modality's training only); 0: none; None (default):
        ``KEEP_OTHERS_WEIGHT`` with ``only_new_target`` False.
    shared_lr_scale: with ``only_new_target`` False, the shared parts train at ``learning_rate`` times this, the new
        target's bag and query at ``learning_rate``; None (default): ``SHARED_LR_SCALE``.
    calibrate_object_size: with ``zoom`` object-size domains, choose the release's "auto" inference object size on
        their validation images (``training.calibration``); False keeps the image processor's.
    prompt_fraction: the share of batches (drawn from the seed) that are prompted, with boxes or clicks simulated
        from the ground truth (``training.prompts``); the rest stay prompt-free. 0: prompt-free training only.
    prompt_max_objects: a boxes batch prompts at most this many objects per image (drawn when there are more).
    prompt_box_jitter: each side of a simulated box is pushed out by up to this share of the box's side.
    """

    stage: ClassVar[str] = "espmedsam"
    output_dir: str = "outputs/espmedsam"
    init_from: str | None = f"{DistillConfig.output_dir}/{RELEASE}"
    classifier_domains: list[str] | None = None
    classifier_epochs: int = 0
    new_target: str | None = None
    target_modality: str | None = None
    new_modality: str | None = None
    like_modality: str | None = None
    new_modality_target: str | None = None
    only_new_target: bool = True
    keep_others_weight: float | None = None
    shared_lr_scale: float | None = None
    calibrate_object_size: bool = True
    prompt_fraction: float = 0.0
    prompt_max_objects: int = 8
    prompt_box_jitter: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        self._check_prompts()
        if (self.new_target is None) != (self.target_modality is None):
            raise ValueError("new_target and target_modality go together: --new-target NAME --modality MODALITY")
        if self.new_target is not None and self.init_from is None:
            raise ValueError("new_target needs a trained model to add it to: give init_from (--init-from)")
        if (self.new_modality is None) != (self.like_modality is None):
            raise ValueError("new_modality and like_modality go together: --new-modality NAME --like MODALITY")
        if self.new_modality is None and self.new_modality_target is not None:
            raise ValueError("new_modality_target names the target of a new modality: give --new-modality too")
        if self.new_modality is not None and (self.init_from is None or self.new_target is not None):
            raise ValueError("new_modality needs a trained model to add it to (give init_from, --init-from) and "
                             "goes without new_target: add one modality or one target at a time")
        value = self.keep_others_weight
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < math.inf):
            raise ValueError(f"keep_others_weight must be a number >= 0, got {value!r}")
        if value and self.only_new_target:
            raise ValueError("keep_others_weight keeps the other targets while a new target or modality trains with "
                             "the shared parts: give it with --train-all")
        scale = self.shared_lr_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1):
            raise ValueError(f"shared_lr_scale must be a number in (0, 1], got {scale!r}")
        if scale is not None and self.only_new_target:
            raise ValueError("shared_lr_scale sets the shared parts' learning rate while a new target or modality "
                             "trains with them: give it with --train-all")
        if self.prompt_fraction and (self.new_target is not None or self.new_modality is not None):
            raise ValueError("prompt_fraction trains the prompted masks of the model's own targets; it cannot be "
                             "combined with new_target or new_modality")

    def _check_prompts(self) -> None:
        for name, low, high in (("prompt_fraction", 0, 1), ("prompt_box_jitter", 0, 10)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        value = self.prompt_max_objects
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"prompt_max_objects must be an integer >= 1, got {value!r}")


FREEZABLE = ("encoder", "aggregator", "bags", "prompt_generator", "mask_decoder", "modality_classifier")
"""Parts of an ``EspMedSamModel`` that ``freeze`` may name (``encoder`` = ``aggregator`` + ``bags``)."""


def check_trackers(names: list[str]) -> None:
    """Every ``report_to`` tracker is one accelerate knows and is installed (accelerate itself only logs a missing
    one at debug level and trains on without it)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [kind.value for kind in LoggerType if kind.value != "all"]
    available = {str(kind.value if isinstance(kind, LoggerType) else kind) for kind in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ValueError(f"report_to: unknown tracker {name!r}; expected some of {', '.join(known)}")
        if name not in available:
            raise ValueError(f"report_to: {name} is not installed (pip install {name.replace('_', '-')}), or leave "
                             "it out of --report-to")


def check_freeze(names: list[str]) -> None:
    unknown = sorted(set(names) - set(FREEZABLE))
    if unknown:
        raise ValueError(f"freeze: unknown part(s) {unknown}; expected some of {', '.join(FREEZABLE)}")


def expand_freeze(names: list[str]) -> set[str]:
    """The frozen parts, with ``encoder`` standing for ``aggregator`` and ``bags`` (and both for ``encoder``)."""
    parts = set(names)
    if "encoder" in parts:
        parts |= {"aggregator", "bags"}
    if {"aggregator", "bags"} <= parts:
        parts.add("encoder")
    return parts


STAGE_CONFIGS: dict[str, type[TrainingConfig]] = {
    "teacher": TeacherConfig,
    "distill": DistillConfig,
    "espmedsam": EspMedSamStageConfig,
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options of a YAML config file (an empty file has none); a missing file, YAML that does not parse, or
    YAML that is not a mapping is an error naming the file (and the line and column where parsing stopped)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(loaded).__name__}")
    return loaded


def load_config(stage: str, path: str | Path | None = None, **overrides: Any) -> TrainingConfig:
    """The configuration of ``stage``: defaults, then the YAML file at ``path``, then ``overrides`` (not None)."""
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_config_file(path)
        if loaded.get("stage", stage) != stage:
            raise ValueError(f"{path} is a config for stage {loaded['stage']!r}, not {stage!r}")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return STAGE_CONFIGS[stage].from_dict(data)
