"""Model cards and publishing of trained stages, through the hub engineer's ``esp_medsam_hf.hub`` module.

``stage_card`` turns a stage's configuration and evaluation report into a ``ModelCardInfo``; ``publish_stages``
commits each stage folder to its branch (``stage-1-teacher``, ``stage-2-distill``, ``stage-3-esp-medsam``, ``main``)
with ``publish_model``. The endpoint is passed explicitly, because huggingface_hub reads ``HF_ENDPOINT`` only once,
when it is imported.
"""

from __future__ import annotations

from pathlib import Path

from ..data.domains import get_domain
from ..hub.cards import DomainResult, ModelCardInfo
from ..hub.publish import MAIN_BRANCH, STAGE_BRANCHES, RetryPolicy, StageRelease, publish_model

STAGE_TO_BRANCH = dict(zip(("teacher", "distill", "espmedsam"), STAGE_BRANCHES))


def domain_results(report: dict, synthetic: bool | set[str]) -> list[DomainResult]:
    """The per-domain Dice/HD of an ``evaluate_model`` report as model card results; ``synthetic`` says which
    domains are synthetic stand-ins (True: all, a set: those named)."""
    results = []
    for name, row in report.get("domains", {}).items():
        is_synthetic = name in synthetic if isinstance(synthetic, set) else synthetic
        try:
            spec = get_domain(name)
        except KeyError:
            spec = None
        if spec is not None:
            dataset = f"SYNTHETIC {name}" if is_synthetic else spec.dataset
            modality, unseen = spec.modality, spec.role == "unseen"
        else:
            dataset, modality, unseen = name, row.get("modality", "unknown"), False
        hd = row.get("hd")
        results.append(DomainResult(
            modality=modality, dataset=dataset, dataset_id=f"{'synthetic-' if is_synthetic else ''}{name}",
            dice=float(row["dice"]), hd=float(hd) if hd is not None and hd == hd and hd != float("inf") else None,
            split=report.get("split", "test"), unseen=unseen,
        ))
    return results


def stage_card(
    branch: str,
    model_name: str,
    *,
    training_config: dict | None = None,
    report: dict | None = None,
    synthetic: bool | set[str] = True,
    parameters: int | None = None,
    image_size: int | None = None,
    notes: str | None = None,
    base_model: str | None = None,
) -> ModelCardInfo:
    """The ``ModelCardInfo`` of one branch."""
    if branch not in (*STAGE_BRANCHES, MAIN_BRANCH):
        raise ValueError(f"unknown branch {branch!r}; expected one of {', '.join((*STAGE_BRANCHES, MAIN_BRANCH))}")
    return ModelCardInfo(
        model_name=model_name,
        stage=branch,
        training_config=dict(training_config or {}),
        results=domain_results(report, synthetic) if report else [],
        parameters=parameters,
        image_size=image_size,
        notes=notes,
        base_model=base_model,
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
