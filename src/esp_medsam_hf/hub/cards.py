"""Model cards, one per stage branch, built with huggingface_hub's ``ModelCard.from_template``.

Metrics, parameter counts, FLOPs and throughput are passed in as data (evaluation and benchmarking compute them);
this module only lays them out: per-domain Dice and Hausdorff distance go into the card's results table, and those
measured on a Hub dataset also into its ``model-index`` as ``eval_results`` so that the Hub (and ``ModelCard.load``)
can read them back.

Every dataset the metadata names (``datasets`` and each ``model-index`` result's ``dataset.type``) is a Hub dataset
id ``owner/name`` (``check_hub_dataset_id``), as the Hub's model card specification asks; data that is not on the
Hub (the demo's synthetic images, images that PyPI packages ship) is described in the card's text only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

TEMPLATES = Path(__file__).with_name("templates")
PAPER_URL = "https://arxiv.org/abs/2407.14153"
CITATION_BIBTEX = """@article{xu2024espmedsam,
  title   = {{ESP-MedSAM}: Efficient Self-Prompting {SAM} for Universal Domain-Generalized Medical Image Segmentation},
  author  = {Xu, Qing and Li, Jiaxuan and He, Xiangjian and Liu, Ziyu and Chen, Zhen and Duan, Wenting and Li, Chenxin
             and He, Maggie M. and Tesema, Fiseha B. and Cheah, Wooi P. and Wang, Yi and Qu, Rong
             and Garibaldi, Jonathan M.},
  journal = {arXiv preprint arXiv:2407.14153},
  year    = {2024},
  doi     = {10.48550/arXiv.2407.14153},
  url     = {https://arxiv.org/abs/2407.14153}
}"""
STAGE_DESCRIPTIONS = {
    "stage-1-teacher": (
        "Stage 1, the medical teacher: SAM's frozen ViT image encoder with learnable medical tokens on every "
        "attention layer and a learnable MLP beside every block's MLP, plus the self-patch prompt generator and the "
        "query-decoupled modality decoder, fine-tuned on the six source domains."
    ),
    "stage-1-teacher/esp_medsam": (
        "Stage 1, the teacher: an ESP-MedSAM model (the TinyViT image encoder with its parameter bags, kept frozen) "
        "whose self-patch prompt generator and query-decoupled modality decoder learn prompt-free segmentation on "
        "the source domains. Its modality classifier is not trained at this stage (stage 3 fits it): give each "
        "image's modality."
    ),
    "stage-2-distill": (
        "Stage 2, multi-modal decoupled knowledge distillation: the student's modality aggregator learns SAM's "
        "image embeddings (modality-common) and each modality's parameter bag learns the stage-1 teacher's "
        "embeddings on that modality (modality-specific)."
    ),
    "stage-3-esp-medsam": (
        "Stage 3, ESP-MedSAM: the distilled image encoder with the self-patch prompt generator and the "
        "query-decoupled modality decoder, trained on the six source domains."
    ),
    "main": "The released ESP-MedSAM model: the final stage of training.",
}


def check_hub_dataset_id(value: str, what: str = "hub_id") -> str:
    """``value`` when it is a Hub dataset id ``owner/name`` (huggingface_hub's ``validate_repo_id``, with an owner),
    else a ``ValueError`` naming ``what``: the card's metadata names Hub datasets only."""
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"{what} {value!r} is not a Hub dataset id 'owner/name': {err}") from None
    if not isinstance(value, str) or value.count("/") != 1:
        raise ValueError(f"{what} {value!r} is not a Hub dataset id: expected 'owner/name'")
    return value


@dataclass
class DomainResult:
    """Test metrics of one domain: Dice in percent, Hausdorff distance in pixels (None when not measured).

    ``synthetic``: the test images are synthetic; ``mask_sizes``: the sizes (``"HxW"``) of the masks the metrics
    were computed on, so that the Hausdorff distance in pixels can be read. ``hub_id`` (``owner/name``) and
    ``hub_config``: the Hub dataset (and its configuration) the images came from, where they are on the Hub; only
    such results go into the card's ``model-index``.
    """

    modality: str
    dataset: str
    dataset_id: str
    dice: float
    hd: float | None = None
    split: str = "test"
    unseen: bool = False
    synthetic: bool = False
    mask_sizes: list[str] = field(default_factory=list)
    hub_id: str | None = None
    hub_config: str | None = None

    def __post_init__(self) -> None:
        if self.hub_id is not None:
            check_hub_dataset_id(self.hub_id, f"the hub_id of the {self.dataset_id!r} result")


@dataclass
class TrainingData:
    """One dataset a revision was trained on: ``dataset_id`` names it in the card's text, ``hub_id`` (a Hub dataset
    id, where one exists) goes into the card's ``datasets`` metadata, which holds Hub ids only; ``synthetic`` says
    whether its images were generated rather than real."""

    name: str
    dataset_id: str
    synthetic: bool = False
    hub_id: str | None = None

    def __post_init__(self) -> None:
        if self.hub_id is not None:
            check_hub_dataset_id(self.hub_id, f"the hub_id of training data {self.dataset_id!r}")


@dataclass
class ModelCardInfo:
    """The facts of one run that a stage's model card shows. ``flops`` is in GFLOPs per image, ``throughput`` in
    images/s (None: not measured, and the card says so).

    ``datasets``: the training data (``datasets`` metadata, and the Limitations section says whether it was real
    or synthetic); ``base_model``: the Hub id of the weights training started from; ``pipelines``: whether the
    revision carries both pipelines (a student saved with ``save_pretrained_with_pipeline``); without them the card
    shows the Auto-class code only. ``model_type``: the revision's ``config.model_type`` when a stage holds another
    architecture than its usual one (the stage-1 teacher as an ``esp_medsam`` TinyViT model). ``config_root``: absolute paths in ``training_config`` are written relative to
    it (by default, to the deepest folder that holds all of them), so a card never shows the training machine's
    paths. ``usage_modality``: the modality the usage code passes (the model's own: the trained target's).
    ``targets``: the names of what the model segments (its ``config.all_target_names``, an added target's own name
    included); ``branches``: the repository's branches (``publish_model`` fills them in from the repository), the
    only ones the card names.
    """

    model_name: str
    stage: str
    repo_id: str | None = None
    training_config: dict[str, Any] = field(default_factory=dict)
    results: list[DomainResult] = field(default_factory=list)
    parameters: int | None = None
    flops: float | None = None
    throughput: float | None = None
    throughput_device: str | None = None
    image_size: int | None = None
    base_model: str | None = None
    license: str = "apache-2.0"
    notes: str | None = None
    datasets: list[TrainingData] = field(default_factory=list)
    pipelines: bool = True
    model_type: str | None = None
    usage_modality: str = "dermoscopy"
    config_root: str | None = None
    targets: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCardInfo":
        """Build from plain data (e.g. a JSON file); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model card fields {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        data["results"] = [r if isinstance(r, DomainResult) else DomainResult(**r) for r in data.get("results", [])]
        data["datasets"] = [d if isinstance(d, TrainingData) else TrainingData(**d) for d in data.get("datasets", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelCardInfo":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid model card description ({err})") from err


RUN_CARD_FILE = "card.json"
"""The card data ``esp-medsam train`` writes into its run folder (``ModelCardInfo`` as JSON)."""


def find_run_card(folder: str | Path) -> Path | None:
    """The ``card.json`` of a run whose model folder (``release/``, ``final/``, ``best/``) is ``folder``: in the
    folder itself or in the run folder holding it; None when there is none."""
    for candidate in (Path(folder) / RUN_CARD_FILE, Path(folder).parent / RUN_CARD_FILE):
        if candidate.is_file():
            return candidate
    return None


def eval_results(info: ModelCardInfo) -> list[EvalResult]:
    """Two EvalResults (Dice, Hausdorff distance) per domain measured on a Hub dataset (``hub_id``), in the card's
    model-index; the other results are in the card's table only."""
    results = []
    for r in info.results:
        if r.hub_id is None:
            continue
        common = dict(
            task_type="image-segmentation",
            task_name=f"{r.modality} segmentation",
            dataset_type=r.hub_id,
            dataset_name=r.dataset + (" (unseen domain)" if r.unseen else ""),
            dataset_config=r.hub_config,
            dataset_split=r.split,
        )
        results.append(EvalResult(metric_type="dice", metric_name="Dice (%)", metric_value=float(r.dice), **common))
        if r.hd is not None:
            results.append(
                EvalResult(
                    metric_type="hausdorff_distance", metric_name="Hausdorff distance (px)",
                    metric_value=float(r.hd), **common,
                )
            )
    return results


def measured_metrics(info: ModelCardInfo) -> list[str]:
    """The metrics of the card's results (its table and model-index): Dice, and the Hausdorff distance where measured."""
    hd = any(r.hd is not None for r in info.results)
    return (["dice"] + (["hausdorff_distance"] if hd else [])) if info.results else []


def _absolute_paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _absolute_paths(v)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


def portable_config(config: dict[str, Any], root: str | None = None) -> dict[str, Any]:
    """``config`` with every absolute path (a string value, at any depth) made relative to ``root``, or by default
    to the deepest folder holding all of them (``"."`` for that folder itself)."""
    paths = _absolute_paths(config)
    if not paths:
        return dict(config)
    base = root or os.path.commonpath([os.path.dirname(p.rstrip("/")) or "/" for p in paths])

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return Path(os.path.relpath(value, base)).as_posix()
        return value

    return convert(config)


def stage_description(info: ModelCardInfo) -> str:
    """What the revision is: its stage's description, for the architecture it holds (``info.model_type``)."""
    specific = STAGE_DESCRIPTIONS.get(f"{info.stage}/{info.model_type}")
    return specific or STAGE_DESCRIPTIONS.get(info.stage, f"Training stage {info.stage}.")


def build_model_card(info: ModelCardInfo) -> ModelCard:
    """The model card of one stage branch (``info.stage``), ready for ``card.save`` or upload as README.md.

    Metadata: library, pipeline tag, tags, license, ``base_model`` and the Hub ``datasets`` when given, the metrics
    of the results, and the ``model-index`` (named ``info.model_name``) when results were measured on Hub datasets.
    """
    results = eval_results(info)
    card_data = ModelCardData(
        model_name=info.model_name if results else None,
        license=info.license,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=info.base_model,
        datasets=[d.hub_id for d in info.datasets if d.hub_id] or None,
        tags=["medical-imaging", "image-segmentation", "segment-anything", "esp-medsam"],
        metrics=measured_metrics(info) or None,
        eval_results=results or None,
        training_stage=info.stage,
        parameters=info.parameters,
        gflops=info.flops,
        throughput_images_per_s=info.throughput,
    )
    config = portable_config(info.training_config, info.config_root)
    efficiency, missing = [], []
    if info.parameters is not None:
        efficiency.append(f"parameters: {info.parameters / 1e6:.2f} M")
    if info.flops is not None:
        at = f" at {info.image_size}x{info.image_size}" if info.image_size else ""
        efficiency.append(f"FLOPs per image: {info.flops:.3g} G{at}")
    else:
        missing.append("FLOPs")
    if info.throughput is not None:
        on = f" on {info.throughput_device}" if info.throughput_device else ""
        efficiency.append(f"throughput: {info.throughput:.2f} images/s{on}")
    else:
        missing.append("throughput")
    not_measured = ""
    if missing:
        what = " and ".join(missing)
        verb = "was" if len(missing) == 1 else "were"
        not_measured = f"{what[:1].upper()}{what[1:]} {verb} not measured for this run."
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES / "model_card.md"),
        info=asdict(info),
        stage_description=stage_description(info),
        training_config_yaml=yaml.safe_dump(config, sort_keys=True).strip() if config else "",
        efficiency=efficiency,
        not_measured=not_measured,
        synthetic_data=[d.name for d in info.datasets if d.synthetic],
        real_data=[d.name for d in info.datasets if not d.synthetic],
        citation=CITATION_BIBTEX,
        paper_url=PAPER_URL,
    )
