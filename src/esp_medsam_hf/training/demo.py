"""The project's main job: three training stages from LiteMedSAM's real weights on real and synthetic images,
evaluation on real images beside two references, publishing to the embedded local Hub, a reload from the published
revision, and the real images segmented.

Data: the REAL domains that install offline (:mod:`esp_medsam_hf.data.real`: mnfinder's fluorescence nuclei with
the package's own split, vascx's fundus photographs with model-made vessel masks, stardist's DSB 2018 image), plus
SYNTHETIC stand-ins for the modalities no real data ships for (dermoscopy, chest X-ray, breast ultrasound,
colonoscopy: a source domain for training and the unseen domain for zero-shot testing). Models: ESP-MedSAM at
LiteMedSAM's 256 px input (its TinyViT has exactly the aggregator's layout; SAM ViT weights cannot be had offline).

Stages (what runs on a 2-core CPU within the main job's budget; docs/training.md has the reasons):

1. teacher: an ESP-MedSAM model on LiteMedSAM's real encoder, kept frozen; the self-patch prompt generator and the
   query-decoupled decoder learn prompt-free segmentation on the frozen encoder's cached features.
2. MMDKD, modality-specific phase: a student starts as the teacher, and its parameter bags learn to give, from an
   intensity-shifted image, the teacher's embedding of the image itself (the modality-common phase was done
   upstream: LiteMedSAM's TinyViT is distilled from MedSAM's ViT-B).
3. ESP-MedSAM: the student's stem and TinyViT stages 1-2 frozen with their bags and their output cached once per
   view (``frozen_encoder_stages``); the last TinyViT stage with its bags, the neck, the prompt generator, the
   decoder and its modality queries fine-tuned on real and synthetic images; then the modality classifier fitted
   on every domain's training images (the training images' pooled stem features come from the cache).
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

from ..data.domains import DOMAIN_NAMES, SOURCE_DOMAINS, get_domain
from .config import DistillConfig, EspMedSamStageConfig, TeacherConfig
from .demo_summary import demo_summary, write_summary

logger = logging.getLogger(__name__)

REPO_ID = "esp-medsam/esp-medsam-demo"
# what a demo run writes into its output folder (and all that --overwrite removes)
OUTPUTS = ("data", "stage-1-teacher", "stage-2-distill", "stage-3-esp-medsam", "evaluation", "hub", "real_images",
           "summary.json", "SUMMARY.md")
REAL_TRAINING = ("mnfinder", "vascx")
"""Real domains with training images; ``dsb-stardist`` (one image) is test only."""
SYNTHETIC_SOURCE = ("isic", "lung", "ultrasound", "cvccdb")
"""Source domains of the modalities no real data with masks ships for: SYNTHETIC stand-ins."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo. ``full()`` is README command 1, ``quick()`` is for tests."""

    image_size: int = 256
    real_limit: int | None = None
    synthetic_train: int = 2
    synthetic_test: int = 1
    batch_size: int = 8
    teacher_learning_rate: float = 4e-4
    teacher_epochs: int = 5
    teacher_views: int = 1
    distill_steps: int = 3
    distill_batch_size: int = 2
    espmedsam_learning_rate: float = 2e-4
    espmedsam_steps: int = 252
    espmedsam_batch_size: int = 2
    espmedsam_frozen_stages: int = 3
    espmedsam_views: int = 7
    nuclei_object_size: tuple[float, float] = (6.0, 40.0)
    fundus_scale: tuple[float, float] = (0.5, 2.0)
    fundus_crops: int = 8
    photometric: bool = True
    classifier_epochs: int = 60
    classifier_images: int = 3

    def zoom(self) -> dict:
        """Stage 3's ``zoom``: mnfinder's nuclei 6 to 40 px across in the model's input (around the 16 px "auto"
        aims for), vascx's photographs at 0.5 to 2x their native pixels, ``fundus_crops`` crops of each an epoch
        (one crop an epoch left the vessels undertrained, docs/training.md); synthetic stand-ins: whole images."""
        return {"mnfinder": {"object_size": list(self.nuclei_object_size)},
                "vascx": {"scale": list(self.fundus_scale), "crops": self.fundus_crops}}

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls()

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(real_limit=1, synthetic_train=1, synthetic_test=1, batch_size=4, teacher_epochs=1,
                   distill_steps=1, espmedsam_steps=2, espmedsam_batch_size=4, espmedsam_views=1, fundus_crops=2,
                   classifier_epochs=3, classifier_images=1)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to touch an existing run unless ``overwrite``; then remove only what a demo run writes."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; expected a folder (new, or a demo run's)")
    existing = [name for name in OUTPUTS if (output / name).exists()]
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} already holds files; choose another --output or pass --overwrite")
        left = sorted(p.name for p in output.iterdir() if p.name not in OUTPUTS)
        if left:
            raise FileExistsError(f"{output} holds files that are not a demo's ({', '.join(left[:5])}); not touching it")
        for name in existing:
            path = output / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    output.mkdir(parents=True, exist_ok=True)


@dataclass
class DemoData:
    """What the stages train on, what the evaluation scores, and what the classifier learns from."""

    train: dict
    real_test: dict
    synthetic_test: dict
    classifier: dict
    label: str


def data_label(image_size: int) -> str:
    """What the models are trained on, for the cards and the report: the DSB image is named as test data only."""
    return ("REAL images: mnfinder nuclei (hand-made masks), vascx fundus (vessel masks made by vascx's models); "
            "SYNTHETIC stand-ins for dermoscopy, chest X-ray, breast ultrasound and colonoscopy "
            f"({image_size} px); the stardist DSB 2018 image (hand-made masks) is a test image only, never trained on")


def mnfinder_group(file_name: str) -> str:
    """The acquisition group of an mnfinder row: the folder of its file (``training/2022-10-14_U2OS/1.png`` ->
    ``2022-10-14_U2OS``)."""
    parts = file_name.split("/")
    return parts[1] if len(parts) == 3 else ""


def hold_out_group(mnfinder, group: str) -> tuple:
    """(mnfinder without the acquisition group ``group`` in any split, the group's images of every split as one
    test split) for the cross-lab check; an unknown group is an error naming the known ones."""
    import datasets

    from .data import TrainingDataError

    known = sorted({mnfinder_group(name) for split in mnfinder.values() for name in split["file_name"]})
    if group not in known:
        raise TrainingDataError(f"--hold-out-group: mnfinder has no acquisition group {group!r}; its groups: "
                         f"{', '.join(known)}")

    def keep(inside: bool):
        return lambda names: [(mnfinder_group(name) == group) == inside for name in names]

    rest = datasets.DatasetDict({split: rows.filter(keep(False), input_columns="file_name", batched=True)
                                 for split, rows in mnfinder.items()})
    held = datasets.concatenate_datasets([rows.filter(keep(True), input_columns="file_name", batched=True)
                                          for rows in mnfinder.values()])
    return rest, datasets.DatasetDict({"test": held})


def build_data(output: Path, settings: DemoSettings, seed: int, progress: bool,
               hold_out: str | None = None) -> DemoData:
    """The real domains prepared through ``esp-medsam prepare``'s plain layout, and the synthetic stand-ins;
    ``hold_out`` (an mnfinder acquisition group) leaves that group out of training and tests on all its images."""
    from ..data.real import archive_dir, prepare_real_domains
    from ..data.synthetic import synthetic_domains
    from .data import load_domains

    real_names = [*REAL_TRAINING, "dsb-stardist"]
    cache = archive_dir().parent / ("real" if settings.real_limit is None else f"real-limit{settings.real_limit}")
    prepare_real_domains(real_names, output / "data", cache=cache, limit=settings.real_limit, progress=progress)
    real = load_domains(str(output / "data"), real_names, splits={"train": 0, "validation": 0, "test": 0})
    if hold_out is not None:
        real["mnfinder"], held = hold_out_group(real["mnfinder"], hold_out)
        real[f"mnfinder-held-out:{hold_out}"] = held
        real_names.append(f"mnfinder-held-out:{hold_out}")
    splits = {"train": settings.synthetic_train, "validation": 1, "test": settings.synthetic_test}
    source = synthetic_domains(list(SYNTHETIC_SOURCE), splits, seed=seed, size=settings.image_size)
    unseen_names = [n for n in DOMAIN_NAMES if n not in SOURCE_DOMAINS and get_domain(n).modality in
                    {get_domain(s).modality for s in SYNTHETIC_SOURCE}]
    unseen = synthetic_domains(unseen_names, {"train": settings.classifier_images,
                                              "test": settings.synthetic_test}, seed=seed, size=settings.image_size)
    others = synthetic_domains([n for n in DOMAIN_NAMES if n not in SYNTHETIC_SOURCE and n not in unseen_names],
                               {"train": settings.classifier_images}, seed=seed, size=settings.image_size)
    train = {**{name: real[name] for name in REAL_TRAINING}, **source}
    label = data_label(settings.image_size)
    return DemoData(
        train=train,
        real_test={name: real[name] for name in real_names},
        synthetic_test={**source, **unseen},
        classifier={**train, **unseen, **others},
        label=label,
    )


def stage_configs(output: Path, settings: DemoSettings, seed: int, progress: bool, threads: int | None):
    """The three stage configurations of the demo (each also written as ``config.yaml`` in its run folder)."""
    common = dict(model_size="official", image_size=settings.image_size, seed=seed, progress=progress,
                  threads=threads, checkpoint_every=0, keep_checkpoints=1, mixed_precision="auto")
    teacher = TeacherConfig(
        output_dir=str(output / "stage-1-teacher"), init_from="litemedsam", freeze=["encoder"],
        cache_features=True, feature_views=settings.teacher_views, epochs=settings.teacher_epochs,
        batch_size=settings.batch_size, learning_rate=settings.teacher_learning_rate, lr_decay=0.9, **common,
    )
    distill = DistillConfig(
        output_dir=str(output / "stage-2-distill"), teacher=str(output / "stage-1-teacher" / "release"),
        init_from=str(output / "stage-1-teacher" / "release"), common_max_steps=0,
        specific_max_steps=settings.distill_steps, intensity_augment=True, epochs=1,
        batch_size=settings.distill_batch_size, learning_rate=1e-3, validate=False, **common,
    )
    espmedsam = EspMedSamStageConfig(
        output_dir=str(output / "stage-3-esp-medsam"), init_from=str(output / "stage-2-distill" / "release"),
        epochs=100, max_steps=settings.espmedsam_steps, batch_size=settings.espmedsam_batch_size, lr_decay=0.8,
        frozen_encoder_stages=settings.espmedsam_frozen_stages, cache_features=True,
        feature_views=settings.espmedsam_views, learning_rate=settings.espmedsam_learning_rate,
        zoom=settings.zoom(), photometric=settings.photometric,
        classifier_domains=["all"], classifier_epochs=settings.classifier_epochs, **common,
    )
    return teacher, distill, espmedsam


def evaluate_final(model_dir: Path, data: DemoData, output: Path, progress: bool) -> dict:
    """Dice/HD of the final model on the real test images (beside Otsu and LiteMedSAM with ground-truth boxes) and
    on the synthetic test images; the report in ``output/evaluation``. The images take the path users take
    (``backends.resolve_backend``'s automatic choice: onnxruntime on a CPU, int8 where it holds), which is what the
    figures describe, and is 0.55x the eager model's time per tile on a 2-core CPU (docs/training.md)."""
    from ..data.baselines import LiteMedSamBoxes, reference_methods
    from ..data.evaluation import evaluate_model, write_report
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

    model = EspMedSamModel.from_pretrained(model_dir).optimize_for_inference()
    processor = EspMedSamProcessor.from_pretrained(model_dir)
    # the interactive report reuses the evaluation's prompt-free predictions and LiteMedSAM's box masks
    cases, predictions, litemedsam = {}, {}, LiteMedSamBoxes()
    report = evaluate_model(model, processor, data.real_test, split="test", cases=cases, progress=progress,
                            references=reference_methods(litemedsam=litemedsam), backend=None, predictions=predictions)
    synthetic = evaluate_model(model, processor, data.synthetic_test, split="test", cases=cases, progress=progress,
                               references=reference_methods(("otsu",)), backend=None)
    report["domains"].update(synthetic["domains"])
    report["summary"] = synthetic["summary"]
    for key in ("num_images", "seconds"):
        report[key] += synthetic[key]
    report["images_per_second"] = report["num_images"] / report["seconds"]
    report["scale_tables"] = demo_scale_tables(model, processor, data.real_test, report, backend=None,
                                               predictions=predictions)
    write_report(report, output / "evaluation", cases=cases, data_label=data.label)
    from ..data.interactive import evaluate_interactive

    # prompts on the real test images: one GT box per object beside LiteMedSAM's, and the click curve
    evaluate_interactive(model, processor, data.real_test, output / "evaluation", litemedsam=litemedsam,
                         progress=progress, backend=None, predictions=predictions)
    return report


def demo_scale_tables(model, processor, real_test: dict, report: dict, backend: str | None = "eager",
                      predictions: dict | None = None) -> dict:
    """The scale table (``data.scale_table``) of the real test sets: the nuclei at x0.5, x1, x2 and x4 at the default
    ("auto") scale, Otsu beside; the fundus photographs at x1 ("auto", whole view, native pixels in tiles). The x1 rows
    and masks (``report``, ``predictions``) are the evaluation's own, not run again, nor is a view they equal.
    mnfinder's micronuclei, which its masks leave out, are scored as don't care too (``real.left_out_masks``)."""
    from ..data.real import left_out_masks
    from ..data.scale_table import ZOOMS, dataset_pairs, scale_table

    tables = {}
    for name, extra in (("mnfinder", False), ("dsb-stardist", False), ("vascx", True)):
        if name not in real_test or not len(real_test[name]["test"]) or name not in report["domains"]:
            continue
        pairs, modality = dataset_pairs(real_test[name]["test"])
        files = real_test[name]["test"]["file_name"]
        x1 = [(predictions or {}).get((name, file)) for file in files]
        tables[name] = scale_table(model, processor, pairs, modality, zooms=ZOOMS if not extra else [1.0],
                                   extra_views=extra, backend=backend, known=[evaluation_row(report["domains"][name])],
                                   x1_masks=None if None in x1 else [prediction.masks[0] for prediction in x1],
                                   left_out=left_out_masks(name, files))
    return tables


def evaluation_row(domain: dict) -> dict:
    """A scale-table row (x1, the default scale) from an ``evaluate_model`` domain entry scored beside Otsu."""
    per_image = domain["per_image"]
    return {"label": "x1", "scale": "default", "zoom": 1.0, "dice": domain["dice"],
            "otsu": domain["references"]["otsu"], "per_image": [entry["dice"] for entry in per_image],
            "scales": [entry.get("scale") for entry in per_image]}


def run_demo(output: str | Path, *, quick: bool = False, overwrite: bool = False, seed: int = 0,
             progress: bool = True, threads: int | None = None, hold_out: str | None = None) -> dict:
    """Run the demo into ``output``; returns the summary (also written as summary.json and SUMMARY.md).
    ``hold_out``: the cross-lab check, an mnfinder acquisition group (e.g. ``2022-10-14_U2OS``) left out of
    training and tested on (all its images), beside Otsu."""
    from .stages import run_distill, run_espmedsam, run_teacher

    output = Path(output).resolve()
    settings = DemoSettings.quick() if quick else DemoSettings.full()
    check_output(output, overwrite)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        logger.info("demo: %s done in %.1f s (%.1f s so far)", name, timings[name], time.perf_counter() - started)
        return time.perf_counter()

    tick = time.perf_counter()
    data = build_data(output, settings, seed, progress, hold_out)
    tick = lap("data", tick)
    teacher_config, distill_config, esp_config = stage_configs(output, settings, seed, progress, threads)

    teacher = run_teacher(teacher_config, data=data.train)
    tick = lap("stage 1 (teacher)", tick)
    distill = run_distill(distill_config, data=data.train)
    tick = lap("stage 2 (distillation)", tick)
    esp = run_espmedsam(esp_config, data=data.train, classifier_data=data.classifier)
    tick = lap("stage 3 (ESP-MedSAM)", tick)

    report = evaluate_final(esp.release_dir, data, output, progress)
    tick = lap("evaluation", tick)

    releases = demo_releases(teacher, distill, esp, report, (teacher_config, distill_config, esp_config), data,
                             settings, output)
    commits, reload = publish_and_reload(output, releases, esp.release_dir)
    lap("publishing, reload and real images", tick)

    summary = demo_summary(output, quick, dataclasses.asdict(settings), timings, time.perf_counter() - started, data,
                           report, teacher, distill, esp, commits, reload, REPO_ID)
    write_summary(output, summary, report)
    return summary


def demo_releases(teacher, distill, esp, report: dict, configs: tuple, data: DemoData, settings: DemoSettings,
                  output: Path):
    """``(branch, folder, card)`` of every stage and of ``main``. The teacher and the distilled student are scored
    on the real DSB 2018 image, whole view, for their cards (the final model's card has the whole evaluation)."""
    from ..data.evaluation import evaluate_model
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel, count_parameters
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor
    from .publishing import STAGE_TO_BRANCH, measured_efficiency, stage_card, training_data

    teacher_config, distill_config, esp_config = configs
    synthetic = set(data.synthetic_test) | set(data.classifier) - set(REAL_TRAINING)
    note = (f"Trained by `esp-medsam demo` from LiteMedSAM's real weights at {settings.image_size} px on {data.label}. "
            "A demonstration of the training pipeline on a 2-core CPU, not a medical device.")
    facts = {"notes": note, "datasets": training_data(list(data.train), synthetic), "config_root": output,
             "base_model": "bowang-lab/LiteMedSAM", "synthetic": synthetic}
    cards = {}
    flops: dict[str, float] = {}  # GFLOPs per configuration: the three stages usually share one
    for stage, result, config, name in (("teacher", teacher, teacher_config, "esp-medsam-demo-teacher"),
                                        ("distill", distill, distill_config, "esp-medsam-demo"),
                                        ("espmedsam", esp, esp_config, "esp-medsam-demo")):
        model = EspMedSamModel.from_pretrained(result.release_dir).eval()
        if stage == "espmedsam":
            stage_report = report
        else:
            processor = EspMedSamProcessor.from_pretrained(result.release_dir)
            # the whole view: a stage before ESP-MedSAM has no calibrated object size for "auto" to aim at
            stage_report = evaluate_model(model, processor, {"dsb-stardist": data.real_test["dsb-stardist"]},
                                          compute_hausdorff=False, progress=False, scale="whole")
        extra = stage_metrics_note(stage, result.metrics)
        if stage != "espmedsam":
            extra += " Its Dice on the DSB 2018 image is the whole image in one view (scale 'whole')."
        architecture = json.dumps({k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"},
                                  sort_keys=True, default=str)
        efficiency = measured_efficiency(model, stage_report, flops.get(architecture))
        if "flops" in efficiency:
            flops[architecture] = efficiency["flops"]
        cards[stage] = stage_card(STAGE_TO_BRANCH[stage], name, training_config=config.to_dict(), report=stage_report,
                                  parameters=count_parameters(model), **{**facts, "notes": note + extra},
                                  model_type=model.config.model_type, **efficiency)
    main_card = dataclasses.replace(cards["espmedsam"], stage="main")
    return [
        (STAGE_TO_BRANCH["teacher"], teacher.release_dir, cards["teacher"]),
        (STAGE_TO_BRANCH["distill"], distill.release_dir, cards["distill"]),
        (STAGE_TO_BRANCH["espmedsam"], esp.release_dir, cards["espmedsam"]),
        ("main", esp.release_dir, main_card),
    ]


def stage_metrics_note(stage: str, metrics: dict) -> str:
    """The card note's sentence on a stage's own validation metrics; metrics the run did not measure are left out."""
    names = {"teacher": {"validation_dice": "validation Dice"},
             "distill": {"common_mse": "modality-common embedding MSE", "specific_mse": "modality-specific embedding MSE"}}
    measured = [f"{label} {metrics[key]:.4g}" for key, label in names.get(stage, {}).items()
                if isinstance(metrics.get(key), (int, float))]
    return f" Stage metrics: {', '.join(measured)}." if measured else ""


def publish_and_reload(output: Path, releases: list, final_dir: Path) -> tuple[dict, dict]:
    """Publish every branch to the embedded local Hub, then reload ``main`` in a fresh process (HF_ENDPOINT must be
    set before huggingface_hub loads) that compares it with ``final_dir`` and segments the real images."""
    from ..testing.localhub import LocalHub
    from .publishing import publish_stages

    with LocalHub(output / "hub") as hub:
        logger.info("demo: local Hub at %s", hub.endpoint)
        commits = publish_stages(REPO_ID, releases, endpoint=hub.endpoint, token=hub.token)
        # generous client timeouts: on a loaded CPU the loopback Hub can take longer than huggingface_hub's 10 s
        env = {**os.environ, **hub.env, "HF_HUB_CACHE": str(output / "hub" / "cache"),
               "HF_MODULES_CACHE": str(output / "hub" / "modules"), "HF_HUB_ETAG_TIMEOUT": "120",
               "HF_HUB_DOWNLOAD_TIMEOUT": "120"}
        command = [sys.executable, "-m", "esp_medsam_hf.training.reload_check", "--repo", REPO_ID,
                   "--revision", "main", "--reference", str(final_dir), "--output", str(output / "real_images")]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"reloading {REPO_ID}@main from the local Hub failed:\n{completed.stderr[-3000:]}")
    reload = json.loads(next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return commits, reload
