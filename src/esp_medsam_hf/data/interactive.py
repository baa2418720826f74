"""Prompted evaluation: Dice with one ground-truth box per object (beside LiteMedSAM with the same boxes), and the
interactive curve: start prompt-free, then up to ``clicks`` clicks, each at the centre of the largest error region
(positive on a missed region, negative on an extra one), with the Dice after each click.

:func:`evaluate_interactive` is the entry point the demo's evaluation calls; it writes ``interactive.md``,
``interactive.json`` and ``interactive_curve.png``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..metrics.functional import dice_score
from ..models.esp_medsam.fileio import atomic_file
from ..models.esp_medsam.prompt_session import EspMedSamPromptSession
from .domains import MODALITY_NAMES
from .prompt_simulation import click_at_largest_error, component_boxes
from .schema import image_to_rgb, mask_to_bool

logger = logging.getLogger(__name__)

CLICKS = 5
"""Clicks of the interactive curve."""


def click_curve(session: EspMedSamPromptSession, reference: np.ndarray, clicks: int = CLICKS) -> list[float]:
    """Dice (%) of the prompt-free mask, then after each simulated click (the clicks accumulate)."""
    prediction, points, labels = session.free_mask, [], []
    curve = [dice_score(prediction, reference)]
    for _ in range(clicks):
        click = click_at_largest_error(prediction, reference)
        if click is None:
            curve.append(curve[-1])
            continue
        points.append(click[:2])
        labels.append(click[2])
        prediction = session.mask(points=points, labels=labels)
        curve.append(dice_score(prediction, reference))
    return curve


def score_image(model, processor, image: np.ndarray, reference: np.ndarray, modality: int,
                litemedsam: Callable | None, clicks: int, backend: str | None = "eager", prediction=None) -> dict:
    """One image: prompt-free Dice, Dice with one ground-truth box per object (LiteMedSAM's boxes), LiteMedSAM's
    Dice with the same boxes, and the click curve. The session segments the image at the default scale on
    ``backend`` (as the evaluation does: its prompt-free mask is the evaluation's), or takes ``prediction``, the
    evaluation's own ``predict`` result for the image (``EspMedSamPromptSession``'s ``prediction``)."""
    session = EspMedSamPromptSession(model, processor, image, modality, backend=backend, prediction=prediction)
    boxes = component_boxes(reference)
    entry = {"dice": dice_score(session.free_mask, reference), "objects": len(boxes),
             "dice_boxes": dice_score(session.mask(boxes=boxes.tolist()), reference),
             "curve": click_curve(session, reference, clicks)}
    if litemedsam is not None:
        entry["dice_litemedsam_boxes"] = dice_score(litemedsam(image, reference), reference)
    return entry


def interactive_report(model, processor, datasets: Mapping, *, split: str = "test", clicks: int = CLICKS,
                       litemedsam: Callable | None = None, progress: bool = True,
                       backend: str | None = "eager", predictions: Mapping | None = None) -> dict:
    """Per domain of ``datasets`` (as ``evaluate_model`` takes them): mean prompt-free, box and LiteMedSAM-box Dice,
    the mean click curve and the curve of the image lowest prompt-free; per image entries too. ``predictions``:
    ``evaluate_model``'s of the same images at the default scale on ``backend`` (keyed ``(name, file_name)``),
    reused instead of segmenting each image again."""
    from tqdm.auto import tqdm

    from .evaluation import _as_split

    was_training = model.training
    model.eval()
    report: dict = {"split": split, "clicks": clicks, "domains": {}}
    try:
        for name, data in datasets.items():
            dataset = _as_split(data, split)
            per_image = []
            for row in tqdm(dataset, desc=f"interactive {name}", unit="img", disable=not progress):
                entry = score_image(model, processor, image_to_rgb(row["image"]), mask_to_bool(row["mask"]),
                                    row["modality"], litemedsam, clicks, backend,
                                    (predictions or {}).get((name, row["file_name"])))
                per_image.append({"file_name": row["file_name"], "modality": MODALITY_NAMES[row["modality"]],
                                  **entry})
            report["domains"][name] = domain_summary(per_image)
    finally:
        model.train(was_training)
    return report


def domain_summary(per_image: list[dict]) -> dict:
    """Means over a domain's images, and the curve of its lowest prompt-free image."""
    def mean(key: str) -> float | None:
        values = [e[key] for e in per_image if key in e]
        return float(np.mean(values)) if values else None

    lowest = min(per_image, key=lambda e: e["dice"])
    return {
        "num_images": len(per_image), "dice": mean("dice"), "dice_boxes": mean("dice_boxes"),
        "dice_litemedsam_boxes": mean("dice_litemedsam_boxes"),
        "curve": np.mean([e["curve"] for e in per_image], axis=0).tolist(),
        "lowest": {"file_name": lowest["file_name"], "curve": lowest["curve"]}, "images": per_image,
    }


def markdown(report: dict) -> str:
    """The box table and the click curves as Markdown."""
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    clicks = report["clicks"]
    lines = ["| domain | images | prompt-free | GT boxes | LiteMedSAM + same boxes |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, d in report["domains"].items():
        lines.append(f"| {name} | {d['num_images']} | {number(d['dice'])} | {number(d['dice_boxes'])} | "
                     f"{number(d['dice_litemedsam_boxes'])} |")
    header = " | ".join(f"{k} click{'s' if k != 1 else ''}" for k in range(clicks + 1))
    lines += ["", f"Dice (%) after each simulated click (mean; and the image lowest prompt-free):", "",
              f"| domain | {header} |", "| --- |" + " ---: |" * (clicks + 1)]
    for name, d in report["domains"].items():
        lines.append(f"| {name} mean | " + " | ".join(f"{v:.2f}" for v in d["curve"]) + " |")
        lines.append(f"| {name} lowest ({d['lowest']['file_name']}) | "
                     + " | ".join(f"{v:.2f}" for v in d["lowest"]["curve"]) + " |")
    return "\n".join(lines) + "\n"


def curve_plot(report: dict, path: Path) -> Path:
    """The click curves (mean solid, lowest image dashed, one colour per domain) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for index, (name, d) in enumerate(report["domains"].items()):
        colour = f"C{index}"
        steps = range(len(d["curve"]))
        axis.plot(steps, d["curve"], "o-", color=colour, label=f"{name} (mean)")
        axis.plot(steps, d["lowest"]["curve"], "x--", color=colour, alpha=0.7, label=f"{name} (lowest image)")
    axis.set_xlabel("clicks (0: prompt-free)")
    axis.set_ylabel("Dice (%)")
    axis.set_title("Click to correct: Dice after each click")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
    return path


def write_interactive_report(report: dict, directory: Path) -> None:
    """``interactive.md``, ``interactive.json`` and ``interactive_curve.png`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "interactive.md") as temporary:
        Path(temporary).write_text(markdown(report))
    with atomic_file(directory / "interactive.json") as temporary:
        Path(temporary).write_text(json.dumps(report, indent=1))
    curve_plot(report, directory / "interactive_curve.png")


def evaluate_interactive(model, processor, datasets: Mapping, directory: Path, *, split: str = "test",
                         clicks: int = CLICKS, litemedsam: Callable | None = None, progress: bool = True,
                         backend: str | None = "eager", predictions: Mapping | None = None) -> dict:
    """Score boxes and clicks on ``datasets`` and write the report to ``directory``; returns the report
    (``predictions`` as :func:`interactive_report` takes them)."""
    report = interactive_report(model, processor, datasets, split=split, clicks=clicks, litemedsam=litemedsam,
                                progress=progress, backend=backend, predictions=predictions)
    write_interactive_report(report, Path(directory))
    return report
