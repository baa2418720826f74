"""The project's main job: all three training stages on the embedded data, evaluation, publishing to the embedded
local Hub, a reload from the published revision, and the real images segmented.

Data: the SYNTHETIC stand-ins of the 12 domains (training on the 6 source domains only) and the REAL DSB 2018
microscopy image with its 125-nucleus mask (evaluation only). Models: the tiny configurations (``EspMedSamConfig.tiny``
and ``EspMedSamTeacherConfig.tiny``) at 128 px, with a randomly initialised SAM encoder (no SAM weights can be
downloaded here), so the figures show the pipeline working, not the paper's accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.domains import DOMAIN_NAMES, SOURCE_DOMAINS
from .config import DistillConfig, EspMedSamStageConfig, TeacherConfig

logger = logging.getLogger(__name__)

REPO_ID = "esp-medsam/esp-medsam-demo"
# what a demo run writes into its output folder (and all that --overwrite removes)
OUTPUTS = ("stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam", "evaluation", "hub", "real_images",
           "summary.json", "SUMMARY.md")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``full()`` is README command 1 (a few minutes on 2 cores), ``quick()`` is for tests."""

    image_size: int = 128
    train_images: int = 48
    valid_images: int = 4
    test_images: int = 8
    batch_size: int = 8
    learning_rate: float = 2e-3
    teacher_epochs: int = 3
    common_epochs: int = 2
    specific_epochs: int = 2
    natural_repeats: int = 8
    espmedsam_epochs: int = 10
    classifier_epochs: int = 60
    max_steps: int | None = None

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls()

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(image_size=64, train_images=4, valid_images=1, test_images=2, batch_size=8, teacher_epochs=1,
                   common_epochs=1, specific_epochs=1, natural_repeats=1, espmedsam_epochs=1, classifier_epochs=5,
                   max_steps=2)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to touch an existing run unless ``overwrite``; then remove only what a demo run writes."""
    existing = [name for name in OUTPUTS if (output / name).exists()]
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} already holds files; choose another --output or pass --overwrite")
        for name in existing:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        left = sorted(p.name for p in output.iterdir())
        if left:
            raise FileExistsError(f"{output} holds files that are not a demo's ({', '.join(left[:5])}); not touching it")
    output.mkdir(parents=True, exist_ok=True)


def classifier_accuracy(model, processor, data: dict, split: str = "test") -> dict:
    """Accuracy (%) of the modality classifier on ``split`` of every domain (held-out images)."""
    from .data import Collator, SegmentationDataset

    dataset = SegmentationDataset(data, split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=Collator(processor.image_processor))
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).modality_logits
            correct += int((logits.argmax(-1) == batch["modality"]).sum())
            total += len(batch["modality"])
    return {"accuracy": 100.0 * correct / max(total, 1), "images": total}


def run_demo(output: str | Path, *, quick: bool = False, overwrite: bool = False, seed: int = 0,
             progress: bool = True) -> dict:
    """Run the demo into ``output``; returns the summary (also written as summary.json and SUMMARY.md)."""
    from ..data.evaluation import evaluate_model, markdown_table, write_report
    from ..data.real import dsb2018_real_case
    from ..data.synthetic import synthetic_domains
    from ..hub.local import LocalHub
    from ..modeling_esp_medsam import EspMedSamModel
    from ..processing_esp_medsam import EspMedSamProcessor
    from .publishing import STAGE_TO_BRANCH, measured_efficiency, publish_stages, stage_card, training_data
    from .stages import count_parameters, run_distill, run_espmedsam, run_teacher

    output = Path(output).resolve()
    check_output(output, overwrite)
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        logger.info("demo: %s done in %.1f s (%.1f s so far)", name, timings[name], time.perf_counter() - started)
        return time.perf_counter()

    # 1. Data: synthetic 12 domains (train/validation/test), the real DSB 2018 case for evaluation.
    tick = time.perf_counter()
    logger.info("demo: generating SYNTHETIC data for the 12 domains at %d px", settings.image_size)
    splits = {"train": settings.train_images, "validation": settings.valid_images, "test": settings.test_images}
    source = synthetic_domains(list(SOURCE_DOMAINS), splits, seed=seed, size=settings.image_size)
    unseen_splits = {"train": settings.train_images, "test": settings.test_images}
    unseen = synthetic_domains([n for n in DOMAIN_NAMES if n not in SOURCE_DOMAINS], unseen_splits, seed=seed,
                               size=settings.image_size)
    everything = {name: (source | unseen)[name] for name in DOMAIN_NAMES}
    tick = lap("data", tick)

    common = dict(
        model_size="tiny", image_size=settings.image_size, batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, seed=seed, max_steps=settings.max_steps, progress=progress,
        synthetic_train_images=settings.train_images, synthetic_valid_images=settings.valid_images,
    )

    # 2. Stage 1: the medical teacher.
    teacher_config = TeacherConfig(output_dir=str(output / "stage-1-teacher"), epochs=settings.teacher_epochs,
                                   num_medical_tokens=2, **common)
    teacher = run_teacher(teacher_config, data=source)
    tick = lap("stage 1 (teacher)", tick)

    # 3. Stage 2: MMDKD (modality-common on scikit-image's photographs, then modality-specific).
    distill_config = DistillConfig(
        output_dir=str(output / "stage-2-distill"), teacher=str(teacher.release_dir),
        epochs=max(settings.common_epochs, settings.specific_epochs), common_epochs=settings.common_epochs,
        specific_epochs=settings.specific_epochs, natural_repeats=settings.natural_repeats, **common,
    )
    distill = run_distill(distill_config, data=source)
    tick = lap("stage 2 (distillation)", tick)

    # 4. Stage 3: ESP-MedSAM from the distilled encoder; then the modality classifier on all 12 domains.
    esp_config = EspMedSamStageConfig(
        output_dir=str(output / "stage-3-esp-medsam"), init_from=str(distill.release_dir),
        epochs=settings.espmedsam_epochs, classifier_domains=["all"], classifier_epochs=settings.classifier_epochs,
        **common,
    )
    esp = run_espmedsam(esp_config, data=source, classifier_data=everything)
    tick = lap("stage 3 (ESP-MedSAM)", tick)

    # 5. Evaluation: Dice/HD on the synthetic test splits of the 12 domains and on the real DSB image.
    model = EspMedSamModel.from_pretrained(esp.release_dir).eval()
    processor = EspMedSamProcessor.from_pretrained(esp.release_dir)
    cases: dict = {}
    evaluation_data = {**everything, "dsb-real": dsb2018_real_case()}
    report = evaluate_model(model, processor, evaluation_data, split="test", cases=cases, progress=progress)
    label = (f"SYNTHETIC test images ({settings.test_images} per domain, {settings.image_size} px) and the REAL "
             "DSB 2018 image (dsb-real)")
    write_report(report, output / "evaluation", cases=cases, data_label=label)
    classifier = classifier_accuracy(model, processor, everything)
    tick = lap("evaluation", tick)

    # 6. Publishing: one branch per stage and main, each with its model card, to the embedded local Hub.
    synthetic_source = {name: everything[name] for name in SOURCE_DOMAINS}
    from ..modeling_esp_medsam_teacher import EspMedSamTeacherModel

    teacher_model = EspMedSamTeacherModel.from_pretrained(teacher.release_dir).eval()
    teacher_model_report = evaluate_model(teacher_model, processor, synthetic_source, split="test",
                                          compute_hausdorff=False, progress=False)
    distilled = EspMedSamModel.from_pretrained(distill.release_dir)
    distilled_report = evaluate_model(distilled, processor, synthetic_source, split="test", compute_hausdorff=False,
                                      progress=False)
    note = (f"Trained by `esp-medsam demo` on SYNTHETIC images (tiny configuration, {settings.image_size} px, randomly "
            "initialised SAM encoder): a demonstration of the training pipeline, not a medical model.")
    facts = {"notes": note, "datasets": training_data(SOURCE_DOMAINS), "config_root": output}
    cards = {
        "teacher": stage_card(STAGE_TO_BRANCH["teacher"], "esp-medsam-demo-teacher",
                              training_config=teacher_config.to_dict(), report=teacher_model_report,
                              parameters=count_parameters(teacher_model), **facts,
                              **measured_efficiency(teacher_model, teacher_model_report)),
        "distill": stage_card(STAGE_TO_BRANCH["distill"], "esp-medsam-demo", training_config=distill_config.to_dict(),
                              report=distilled_report, parameters=count_parameters(distilled),
                              **{**facts, "notes": note + f" Embedding MSE: {distill.metrics}."},
                              **measured_efficiency(distilled, distilled_report)),
        "espmedsam": stage_card(STAGE_TO_BRANCH["espmedsam"], "esp-medsam-demo", training_config=esp_config.to_dict(),
                                report=report, parameters=count_parameters(model), **facts,
                                **measured_efficiency(model, report)),
    }
    main_card = dataclasses.replace(cards["espmedsam"], stage="main")
    releases = [
        (STAGE_TO_BRANCH["teacher"], teacher.release_dir, cards["teacher"]),
        (STAGE_TO_BRANCH["distill"], distill.release_dir, cards["distill"]),
        (STAGE_TO_BRANCH["espmedsam"], esp.release_dir, cards["espmedsam"]),
        ("main", esp.release_dir, main_card),
    ]
    with LocalHub(output / "hub") as hub:
        logger.info("demo: local Hub at %s", hub.endpoint)
        commits = publish_stages(REPO_ID, releases, endpoint=hub.endpoint)
        tick = lap("publishing", tick)
        # 7. Reload main from the Hub in a fresh process (HF_ENDPOINT must be set before huggingface_hub loads)
        #    and segment the real images with it.
        env = {**os.environ, **hub.env, "HF_HUB_CACHE": str(output / "hub" / "cache"),
               "HF_MODULES_CACHE": str(output / "hub" / "modules")}
        command = [sys.executable, "-m", "esp_medsam_hf.training.reload_check", "--repo", REPO_ID,
                   "--revision", "main", "--reference", str(esp.release_dir), "--output", str(output / "real_images")]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"reloading {REPO_ID}@main from the local Hub failed:\n{completed.stderr[-3000:]}")
    reload = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    lap("reload and real images", tick)

    summary = {
        "output": str(output),
        "quick": quick,
        "settings": dataclasses.asdict(settings),
        "seconds": round(time.perf_counter() - started, 1),
        "timings_s": timings,
        "data": label,
        "validation_dice": {"teacher": teacher.metrics["validation_dice"], "espmedsam": esp.metrics["validation_dice"]},
        "distillation_mse": distill.metrics,
        "test": {"source_dice": float(np.mean([report["domains"][n]["dice"] for n in SOURCE_DOMAINS])),
                 "unseen_dice": float(np.mean([report["domains"][n]["dice"] for n in DOMAIN_NAMES
                                               if n not in SOURCE_DOMAINS])),
                 "dsb_real_dice": report["domains"]["dsb-real"]["dice"],
                 "per_domain_dice": {name: row["dice"] for name, row in report["domains"].items()},
                 "teacher_source_dice": teacher_model_report["summary"].get("source", {}).get("dice")},
        "modality_classifier": {"held_out_accuracy": classifier["accuracy"], "images": classifier["images"],
                                "train_accuracy": esp.metrics.get("classifier_train_accuracy")},
        "hub": {"repo": REPO_ID, "commits": commits},
        "reload": {k: v for k, v in reload.items() if k != "real_images"},
        "real_images": reload["real_images"],
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "SUMMARY.md").write_text(summary_markdown(summary, markdown_table(report, label)))
    return summary


def summary_markdown(summary: dict, table: str) -> str:
    """A human-readable page of the demo's results."""
    test, clf = summary["test"], summary["modality_classifier"]
    lines = [
        "# esp-medsam demo", "",
        f"All three stages trained, evaluated, published and reloaded in {summary['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in summary['timings_s'].items())}).", "",
        "**SYNTHETIC data** (tiny models at "
        f"{summary['settings']['image_size']} px, random SAM encoder): the numbers show that the pipeline learns, "
        "not the paper's accuracy.", "",
        f"- Test Dice, synthetic source domains: {test['source_dice']:.2f} % (teacher: {test['teacher_source_dice']:.2f} %)"
        " (the evaluation table's source mean also counts the real DSB image)",
        f"- Test Dice, synthetic unseen domains (zero-shot): {test['unseen_dice']:.2f} %",
        f"- Dice on the REAL DSB 2018 image: {test['dsb_real_dice']:.2f} %",
        f"- Modality classifier on {clf['images']} held-out synthetic images of the 12 domains: "
        f"{clf['held_out_accuracy']:.2f} %",
        f"- Published to the local Hub as {summary['hub']['repo']}: "
        + ", ".join(f"`{b}` ({c[:8]})" for b, c in summary["hub"]["commits"].items()),
        f"- Reloaded `main` with from_pretrained(revision='main'): max |difference| "
        f"{summary['reload']['max_abs_difference']:.2e}; through AutoModel: "
        f"{summary['reload']['auto_model_max_abs_difference']:.2e}", "",
        "## Real images (overlays in real_images/)", "",
        "| image | modality given | classifier says | foreground % | Dice % |", "| --- | --- | --- | ---: | ---: |",
    ]
    for record in summary["real_images"]:
        dice = f"{record['dice']:.2f}" if "dice" in record else "n/a (no mask)"
        lines.append(f"| {record['name']} | {record['modality']} | {record['classifier_modality']} "
                     f"({record['classifier_probability']:.2f}) | {record['foreground_percent']:.1f} | {dice} |")
    lines += ["", "## Evaluation (evaluation/results.md)", "", table]
    return "\n".join(lines) + "\n"
