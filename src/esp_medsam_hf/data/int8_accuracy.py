"""int8 against float32 on the real test sets: one trained model through ``prediction.predict`` on the onnxruntime
backend, once with the int8 copy of its export and once with the float32 export, image by image. Per set: the Dice
(%) of each against the reference masks, their difference, and the share of pixels where the two masks agree.

The sets are the real test images the main job evaluates on (``real``): mnfinder's nuclei, the DSB 2018
image, and the vascx fundus photographs at the model's default scale and at native pixels in tiles. The issue's
target: Dice within 0.5 points on every set and masks agreeing on at least 99 % of the pixels. It lives in the data
layer because it reads prepared data; ``esp-medsam benchmark --cpu-paths --model`` runs it beside the timings.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..models.esp_medsam.backends import INT8_MODALITIES
from ..models.esp_medsam.prediction import modality_name

logger = logging.getLogger(__name__)

REAL_SETS = (("mnfinder", None), ("dsb-stardist", None), ("vascx", None), ("vascx", 1.0))
"""(domain, scale) of each measured set; ``None``: the model's saved default scale, ``1.0``: native pixels in tiles."""
DICE_TOLERANCE = 0.5
"""Largest |Dice(int8) - Dice(float32)| in points the target allows on every set."""
AGREEMENT_TARGET = 0.99
"""Smallest share of pixels where the int8 and float32 masks must agree, per set."""


def load_real_test_sets(data_dir: str | Path, prepare: bool = False) -> dict:
    """``{domain: test Dataset}`` of the real domains from ``data_dir`` (a folder ``esp-medsam prepare`` or the main
    job wrote, e.g. ``<demo output>/data``); with ``prepare``, first prepared there from the package archives
    (``real.prepare_real_domains``; no network when the archives are cached)."""
    from .prepared import load_domains
    from .real import prepare_real_domains

    names = sorted({name for name, _ in REAL_SETS})
    if prepare:
        prepare_real_domains(names, data_dir, progress=False)
    domains = load_domains(str(data_dir), names, splits={"test": 0})
    return {name: domains[name]["test"] for name in names}


def _masks(model, processor, image: np.ndarray, modality: int, scale: Any) -> dict[bool, np.ndarray]:
    from ..models.esp_medsam.prediction import predict

    return {int8: predict(model, processor, [image], [modality], backend="onnxruntime", scale=scale,
                          int8=int8).masks[0] for int8 in (False, True)}


def measure_set(model, processor, dataset, scale: Any) -> dict[str, Any]:
    """One set's row: images, Dice of float32 and int8 (mean over images, %), their difference in points, and the
    pixel agreement of the two masks (over all the set's pixels, and the lowest of one image)."""
    from .schema import image_to_rgb, mask_to_bool
    from ..metrics.functional import dice_score, mean_dice

    dice: dict[bool, list[float]] = {False: [], True: []}
    same = total = 0
    lowest = 1.0
    names = set()
    for item in dataset:
        names.add(modality_name(model, int(item["modality"])))
        reference = mask_to_bool(item["mask"])
        masks = _masks(model, processor, image_to_rgb(item["image"]), int(item["modality"]), scale)
        for int8, mask in masks.items():
            dice[int8].append(dice_score(mask, reference))
        agreeing = int((masks[False] == masks[True]).sum())
        same, total = same + agreeing, total + masks[False].size
        lowest = min(lowest, agreeing / masks[False].size)
    fp32, int8 = mean_dice(dice[False]), mean_dice(dice[True])
    return {"images": len(dice[False]), "modalities": sorted(names),
            "int8_by_default": bool(names) and all(name in INT8_MODALITIES for name in names),
            "dice_fp32": fp32, "dice_int8": int8, "dice_difference": int8 - fp32,
            "pixel_agreement": same / max(total, 1), "pixel_agreement_lowest_image": lowest}


def measure_int8_accuracy(model_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Every set of :data:`REAL_SETS` for the model saved in ``model_dir``, from ``data_dir`` (else prepared into a
    temporary folder); returns the rows and whether each meets the target (:data:`DICE_TOLERANCE`, :data:`AGREEMENT_TARGET`)."""
    from ..models.esp_medsam.modeling_esp_medsam import EspMedSamModel
    from ..models.esp_medsam.processing_esp_medsam import EspMedSamProcessor

    model = EspMedSamModel.from_pretrained(model_dir).eval()
    processor = EspMedSamProcessor.from_pretrained(model_dir)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        datasets = load_real_test_sets(data_dir or folder, prepare=data_dir is None)
        for name, scale in REAL_SETS:
            row = {"set": name, "scale": "default" if scale is None else f"x{scale:g} native, tiles",
                   **measure_set(model, processor, datasets[name], scale)}
            row["meets_target"] = (abs(row["dice_difference"]) <= DICE_TOLERANCE
                                   and row["pixel_agreement"] >= AGREEMENT_TARGET)
            logger.info("int8 vs float32 on %s (%s): Dice %.2f vs %.2f, pixels agreeing %.4f", name, row["scale"],
                        row["dice_int8"], row["dice_fp32"], row["pixel_agreement"])
            rows.append(row)
    return {"model": str(model_dir), "data": None if data_dir is None else str(data_dir), "rows": rows,
            "dice_tolerance": DICE_TOLERANCE, "agreement_target": AGREEMENT_TARGET,
            "all_met": all(row["meets_target"] for row in rows),
            "default_met": all(row["meets_target"] for row in rows if row["int8_by_default"])}


def int8_accuracy_markdown(result: dict[str, Any]) -> str:
    """The measurement as a Markdown table."""
    lines = [
        f"int8 against float32 (onnxruntime, `prediction.predict`) on the real test sets; model `{result['model']}`.",
        "",
        "| set | scale | int8 by default | images | Dice fp32 % | Dice int8 % | difference (points) "
        "| pixels agreeing % | lowest image % | target met |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['set']} | {row['scale']} | {'yes' if row.get('int8_by_default') else 'no'} | {row['images']} "
            f"| {row['dice_fp32']:.2f} | {row['dice_int8']:.2f} "
            f"| {row['dice_difference']:+.2f} | {100 * row['pixel_agreement']:.2f} "
            f"| {100 * row['pixel_agreement_lowest_image']:.2f} | {'yes' if row['meets_target'] else 'no'} |"
        )
    lines += ["", f"Target: |difference| <= {result['dice_tolerance']} points and >= "
              f"{100 * result['agreement_target']:.0f} % of pixels agreeing: on the sets int8 is the default for "
              f"({', '.join(INT8_MODALITIES)}) {'met' if result.get('default_met') else 'NOT met'}; on every set, "
              f"int8 forced for all, {'met' if result['all_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


__all__ = ["AGREEMENT_TARGET", "DICE_TOLERANCE", "REAL_SETS", "int8_accuracy_markdown", "load_real_test_sets",
           "measure_int8_accuracy", "measure_set"]
