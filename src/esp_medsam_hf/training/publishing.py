"""Model cards and publishing of trained stages, through :mod:`esp_medsam_hf.hub`.

``stage_card`` turns a stage's configuration and evaluation report into a ``ModelCardInfo``; ``publish_stages``
commits each stage folder to its branch (``stage-1-teacher``, ``stage-2-distill``, ``stage-3-esp-medsam``, ``main``)
with ``publish_model``. The endpoint is passed explicitly, because huggingface_hub reads ``HF_ENDPOINT`` only once,
when it is imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..data.domains import DOMAIN_NAMES, REAL_DOMAIN_NAMES, get_domain
from ..hub.cards import DomainResult, ModelCardInfo, TrainingData
from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
from ..hub.publish import MAIN_BRANCH, STAGE_BRANCHES, RetryPolicy, StageRelease, publish_model

STAGE_TO_BRANCH = dict(zip(("teacher", "distill", "espmedsam"), STAGE_BRANCHES))
REGISTERED = DOMAIN_NAMES + REAL_DOMAIN_NAMES


def _is_synthetic(name: str, synthetic: bool | Collection[str]) -> bool:
    if isinstance(synthetic, bool):
        return synthetic and name in DOMAIN_NAMES
    return name in synthetic


def domain_results(report: dict, synthetic: bool | Collection[str] = True,
                   hub_ids: Mapping[str, str] | None = None) -> list[DomainResult]:
    """The per-domain Dice/HD of an ``evaluate_model`` report as model card results.

    ``synthetic``: ``True`` marks the rows named after one of the 12 domains as synthetic (the demo's generated
    data) and any other row (e.g. ``dsb-real``) as real; ``False`` marks every row real; a collection names the
    synthetic rows. A row that is not a domain name but carries one in ``row["domain"]`` takes that domain's
    dataset name and modality. ``hub_ids``: row name -> the Hub dataset (``owner/name``) its images came from, a
    folder of ``esp-medsam prepare --push-to-hub`` whose configuration is the row's domain; only those rows go into
    the card's model-index.
    """
    hub_ids = hub_ids or {}
    results = []
    for name, row in report.get("domains", {}).items():
        fake = _is_synthetic(name, synthetic)
        domain = name if name in REGISTERED else row.get("domain")
        if domain in REGISTERED:
            spec = get_domain(domain)
            dataset, modality, unseen = spec.dataset, spec.modality, spec.role == "unseen"
        else:
            dataset, modality, unseen = name, row.get("modality", "unknown"), False
        hd = row.get("hd")
        hub_id = hub_ids.get(name)
        results.append(DomainResult(
            modality=modality, dataset=f"SYNTHETIC {dataset}" if fake else dataset,
            dataset_id=f"synthetic-{name}" if fake else name,
            dice=float(row["dice"]), hd=float(hd) if hd is not None and hd == hd and hd != float("inf") else None,
            split=report.get("split", "test"), unseen=unseen, synthetic=fake,
            mask_sizes=list(row.get("mask_sizes", [])), hub_id=hub_id,
            hub_config=(domain if domain in REGISTERED else name) if hub_id else None,
        ))
    return results


def training_data(domains: Collection[str], synthetic: bool | Collection[str] = True,
                  hub_ids: Mapping[str, str] | None = None) -> list[TrainingData]:
    """The card's training datasets for the given domain names (``synthetic`` and ``hub_ids``, the Hub datasets
    they came from, as in ``domain_results``)."""
    hub_ids = hub_ids or {}
    data = []
    for name in domains:
        fake = _is_synthetic(name, synthetic)
        dataset = get_domain(name).dataset if name in REGISTERED else name
        data.append(TrainingData(name=f"SYNTHETIC {dataset}" if fake else dataset,
                                 dataset_id=f"synthetic-{name}" if fake else name, synthetic=fake,
                                 hub_id=hub_ids.get(name)))
    return data


def measured_efficiency(model, report: dict | None = None, flops: float | None = None) -> dict[str, Any]:
    """The card's efficiency facts measured in this run: for an ``EspMedSamModel``, GFLOPs of one batch-1 forward
    at its input size (torch's ``FlopCounterMode`` with eager attention, as the benchmark counts them; the
    teacher's attention calls SDPA, which the counter does not count on every device, so its FLOPs are left
    unmeasured), and, from an ``evaluate_model`` report, the evaluation's throughput (images/s through processor,
    model and post-processing) with the device it ran on. ``flops`` (GFLOPs) skips the count: a figure already
    measured on a model of the same configuration."""
    import torch

    from ..benchmark import count_flops, machine_info

    parameter = next(model.parameters())
    size = model.config.image_size
    facts: dict[str, Any] = {"image_size": size}
    if flops is not None:
        facts["flops"] = flops
    elif isinstance(model, EspMedSamModel):
        pixels = torch.zeros(1, 3, size, size, device=parameter.device)
        modality = torch.zeros(1, dtype=torch.long, device=parameter.device)
        implementation = model.config._attn_implementation
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.set_attn_implementation("eager")
        model.requires_grad_(False)  # the counter's module hooks fail on parameters that require grad
        try:
            facts["flops"] = count_flops(lambda: model(pixels, modality)) / 1e9
        finally:
            model.set_attn_implementation(implementation)
            for parameter in trainable:
                parameter.requires_grad_(True)
    speed = (report or {}).get("model_images_per_second")
    if speed is not None and speed == speed:
        device = str(parameter.device)
        machine = machine_info(device)
        where = machine.get("gpu") or machine["cpu"]
        facts["throughput"] = float(speed)
        threads = torch.get_num_threads()
        facts["throughput_device"] = (f"{device} ({where}, {threads} thread{'s' if threads != 1 else ''}), "
                                      "evaluation including pre- and post-processing")
    return facts


def default_model_type(branch: str) -> str:
    """The architecture a branch holds unless told otherwise: the SAM-ViT teacher on stage 1, else the student."""
    return "esp_medsam_teacher" if branch == STAGE_TO_BRANCH["teacher"] else "esp_medsam"


def stage_card(
    branch: str,
    model_name: str,
    *,
    training_config: dict | None = None,
    report: dict | None = None,
    synthetic: bool | Collection[str] = True,
    parameters: int | None = None,
    image_size: int | None = None,
    notes: str | None = None,
    base_model: str | None = None,
    datasets: list[TrainingData] | None = None,
    flops: float | None = None,
    throughput: float | None = None,
    throughput_device: str | None = None,
    config_root: str | Path | None = None,
    model_type: str | None = None,
    dataset_hub_ids: Mapping[str, str] | None = None,
) -> ModelCardInfo:
    """The ``ModelCardInfo`` of one branch: the run's facts (training ``datasets``, evaluation ``report`` with
    ``synthetic`` saying which rows are synthetic, ``base_model``, efficiency) as parameters. ``model_type`` is the
    published model's ``config.model_type``: a SAM-ViT teacher (``esp_medsam_teacher``, the teacher branch's
    default) ships no pipeline, so its card shows the Auto-class code only; a student (``esp_medsam``) ships both.
    ``dataset_hub_ids``: the report rows measured on Hub datasets (``domain_results``' ``hub_ids``)."""
    if branch not in (*STAGE_BRANCHES, MAIN_BRANCH):
        raise ValueError(f"unknown branch {branch!r}; expected one of {', '.join((*STAGE_BRANCHES, MAIN_BRANCH))}")
    return ModelCardInfo(
        model_name=model_name,
        stage=branch,
        training_config=dict(training_config or {}),
        results=domain_results(report, synthetic, dataset_hub_ids) if report else [],
        parameters=parameters,
        flops=flops,
        throughput=throughput,
        throughput_device=throughput_device,
        image_size=image_size,
        notes=notes,
        base_model=base_model,
        datasets=list(datasets or []),
        pipelines=(model_type or default_model_type(branch)) == "esp_medsam",
        model_type=model_type,
        config_root=str(config_root) if config_root is not None else None,
    )


def publish_stages(
    repo_id: str, releases: list[tuple[str, Path, ModelCardInfo | None]], *, endpoint: str | None = None,
    token: str | None = None, attempts: int = 5,
) -> dict[str, str]:
    """Commit each ``(branch, folder, card)`` to ``repo_id`` at ``endpoint``; returns branch -> commit id."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    stage_releases = [StageRelease(branch, Path(folder), card) for branch, folder, card in releases]
    return publish_model(repo_id, stage_releases, api=api, retry=RetryPolicy(attempts=attempts, base_wait_s=0.5))


def run_card(config, result) -> ModelCardInfo:
    """The model card data of a training run (``config``: its ``TrainingConfig``; ``result``: its ``StageResult``):
    the training domains (real or SYNTHETIC), the released model's target names (an added target's own name
    included), the validation metrics, the model it started from, and usage code with the trained modality."""
    import json

    from ..models.esp_medsam.configuration_esp_medsam import EspMedSamConfig

    saved = json.loads((Path(result.release_dir) / "config.json").read_text())
    targets = EspMedSamConfig.from_dict(saved).all_target_names if saved["model_type"] == "esp_medsam" else []
    synthetic = config.data == "synthetic" or (Path(config.data) / ".synthetic").exists()
    modality = getattr(config, "new_modality", None) or getattr(config, "target_modality", None) or next(
        (get_domain(name).modality for name in result.domains if name in REGISTERED), "dermoscopy")
    start = getattr(config, "init_from", None) or getattr(config, "sam_checkpoint", None)
    base_model = "bowang-lab/LiteMedSAM" if start == "litemedsam" else (
        start if start and not Path(start).exists() and start.count("/") == 1 else None)
    notes = []
    if getattr(config, "new_target", None):
        notes.append(f"Adds the target \"{config.new_target}\" to {config.target_modality} images: its own parameter "
                     "bag and mask query" + (", the only parts trained" if config.only_new_target else "") + ".")
    if getattr(config, "new_modality", None):
        notes.append(f"Adds the modality \"{config.new_modality}\" (segmenting "
                     f"\"{config.new_modality_target or config.new_modality}\"), started from {config.like_modality}: "
                     "its own parameter bag, mask query and modality-classifier class" +
                     ("; its bag and query the only parts trained" if config.only_new_target else "") +
                     ". The modality classifier does not choose it: give modality=\"" + config.new_modality + "\".")
    measured = {key: round(value, 4) for key, value in result.metrics.items() if isinstance(value, (int, float))}
    if measured:
        notes.append(f"Validation metrics of the training run: {measured}.")
    if start and base_model is None:
        notes.append(f"Training started from the local model `{Path(start).name}`.")
    card = stage_card(STAGE_TO_BRANCH[result.stage], Path(config.output_dir).resolve().name,
                      training_config=config.to_dict(), image_size=config.image_size, model_type=saved["model_type"],
                      notes=" ".join(notes) or None, base_model=base_model,
                      datasets=training_data(result.domains, synthetic))
    card.usage_modality, card.targets = modality, list(targets)
    return card


def write_run_card(config, result) -> Path | None:
    """``output_dir/card.json``: ``run_card`` as JSON, written atomically by the main process (which ``esp-medsam
    hub publish`` uses for a folder of the run); None on the other processes."""
    import dataclasses
    import json

    from accelerate import PartialState

    from ..hub.cards import RUN_CARD_FILE
    from ..models.esp_medsam.fileio import atomic_file

    if not PartialState().is_main_process:
        return None
    path = Path(config.output_dir) / RUN_CARD_FILE
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(dataclasses.asdict(run_card(config, result)), indent=1, default=str))
    return path
