"""The main job's summary: its figures (``summary.json``) and their page (``SUMMARY.md``), from the run's timings,
the evaluation's report, the stages' metrics, the Hub commits and the reload check (:mod:`esp_medsam_hf.training.demo`
runs the job and calls these at its end)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..data.domains import SOURCE_DOMAINS
from ..models.esp_medsam.fileio import atomic_file


class RunData(Protocol):
    """What the summary reads of the job's data (``training.demo.DemoData``)."""

    label: str
    real_test: dict
    synthetic_test: dict


def vessel_native_dice(report: dict) -> float | None:
    """Dice (%) of the fundus vessels segmented at native resolution (tiles at scale 1) in the scale tables."""
    rows = report.get("scale_tables", {}).get("vascx", {}).get("rows", [])
    return next((row["dice"] for row in rows if row["scale"] == 1.0), None)


def held_out_group(data: RunData) -> str | None:
    """The mnfinder acquisition group this run left out of training (the cross-lab check), or None."""
    return next((name.split(":", 1)[1] for name in data.real_test if name.startswith("mnfinder-held-out:")), None)


def _mean(report: dict, names) -> float:
    values = [report["domains"][n]["dice"] for n in names if n in report["domains"]]
    return float(np.mean(values)) if values else float("nan")


def demo_summary(output: Path, quick: bool, settings: Mapping[str, Any], timings: dict, seconds: float, data: RunData,
                 report: dict, teacher, distill, esp, commits: dict, reload: dict, repo_id: str) -> dict:
    """The figures of the run (summary.json); ``settings``: the job's sizes (``DemoSettings`` as a dict),
    ``repo_id``: the local Hub repository the stages went to."""
    from ..data.scale_table import scale_table_summary

    real = {name: {"dice": row["dice"], "references": row.get("references", {}),
                   "classifier_accuracy": row.get("classifier_accuracy"), "images": row["num_images"]}
            for name, row in report["domains"].items() if row.get("role") == "real"}
    synthetic_source = [n for n in data.synthetic_test if n in SOURCE_DOMAINS]
    synthetic_unseen = [n for n in data.synthetic_test if n not in SOURCE_DOMAINS]
    real_images = reload["real_images"]
    return {
        "output": str(output),
        "final_model": str(esp.release_dir),
        "quick": quick,
        "held_out_group": held_out_group(data),
        "settings": dict(settings),
        "seconds": round(seconds, 1),
        "timings_s": timings,
        "data": data.label,
        "validation_dice": {"teacher": teacher.metrics["validation_dice"], "espmedsam": esp.metrics["validation_dice"]},
        "distillation_mse": distill.metrics,
        "real": real,
        "scale_tables": scale_table_summary(report.get("scale_tables", {})),
        "vessels_native_dice": vessel_native_dice(report),
        "synthetic": {"source_dice": _mean(report, synthetic_source), "unseen_dice": _mean(report, synthetic_unseen),
                      "per_domain_dice": {n: report["domains"][n]["dice"] for n in data.synthetic_test}},
        "modality_classifier": {"train_accuracy": esp.metrics.get("classifier_train_accuracy"),
                                "real_test_accuracy": {n: r["classifier_accuracy"] for n, r in real.items()},
                                "real_images": {r["name"]: r["classifier_modality"] for r in real_images}},
        "hub": {"repo": repo_id, "commits": commits},
        "reload": {k: v for k, v in reload.items() if k != "real_images"},
        "real_images": real_images,
    }


def summary_markdown(summary: dict, report: dict) -> str:
    """A human-readable page of the demo's results."""
    from ..data.evaluation import markdown_table

    lines = [
        "# esp-medsam demo", "",
        f"All three stages trained from LiteMedSAM's real weights, evaluated, published and reloaded in "
        f"{summary['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in summary['timings_s'].items())}).", "",
        f"Data: {summary['data']}. Final model: `{summary['final_model']}`.", "",
        "## Real test images, prompt-free (Dice %)", "",
        "| domain | images | ours | Otsu | LiteMedSAM + GT boxes | classifier accuracy % |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in summary["real"].items():
        refs = row["references"]
        lines.append(f"| {name} | {row['images']} | **{row['dice']:.2f}** | {refs.get('otsu', float('nan')):.2f} | "
                     f"{refs.get('litemedsam-boxes', float('nan')):.2f} | {row['classifier_accuracy'] or 0:.1f} |")
    if summary.get("vessels_native_dice") is not None:
        lines += ["", f"Fundus vessels at native resolution (tiles of native pixels; vessel masks MADE BY VASCX'S "
                      f"MODELS): Dice **{summary['vessels_native_dice']:.2f}** %."]
    if report.get("scale_tables"):
        from ..data.scale_table import scale_table_markdown

        lines += ["", "## Dice at other magnifications (scale table)", "",
                  scale_table_markdown(report["scale_tables"])]
    synthetic = summary["synthetic"]
    lines += [
        "", f"SYNTHETIC test images: source {synthetic['source_dice']:.2f} %, unseen (zero-shot) "
        f"{synthetic['unseen_dice']:.2f} %.",
        f"Published to the local Hub as {summary['hub']['repo']}: "
        + ", ".join(f"`{b}` ({c[:8]})" for b, c in summary["hub"]["commits"].items()),
        f"Reloaded `main` with from_pretrained(revision='main'): max |difference| "
        f"{summary['reload']['max_abs_difference']:.2e}; through AutoModel: "
        f"{summary['reload']['auto_model_max_abs_difference']:.2e}", "",
        "## Other real images (overlays in real_images/)", "",
        "| image | modality given | classifier says | foreground % | Dice % |", "| --- | --- | --- | ---: | ---: |",
    ]
    for record in summary["real_images"]:
        dice = f"{record['dice']:.2f}" if "dice" in record else "n/a (no mask)"
        lines.append(f"| {record['name']} | {record['modality']} | {record['classifier_modality']} "
                     f"({record['classifier_probability']:.2f}) | {record['foreground_percent']:.1f} | {dice} |")
    lines += ["", "## Evaluation (evaluation/results.md)", "", markdown_table(report, summary["data"])]
    return "\n".join(lines) + "\n"


def write_summary(output: Path, summary: dict, report: dict) -> None:
    """``summary.json`` and ``SUMMARY.md`` in ``output``: both made before either is written, each written whole or
    not at all (a temporary file renamed onto it)."""
    texts = {"summary.json": json.dumps(summary, indent=2) + "\n", "SUMMARY.md": summary_markdown(summary, report)}
    for name, text in texts.items():
        with atomic_file(output / name) as temporary:
            temporary.write_text(text)
