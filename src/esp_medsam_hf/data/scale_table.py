"""The scale table: Dice of a model on the same images shown at several magnifications, Otsu beside each.

A model that learnt one object size fails when a microscope, a camera or a crop changes it. The table shows each
test image at x0.5 (a 2x2 mosaic of the image: objects half their size in the frame), x1, x2 (the centre crop of
half the side) and x4 (the centre crop of a quarter of the side, as a user zooming in would send it), segmented
through ``prediction.predict`` with the model's default scale ("auto" unless saved otherwise) and with Otsu's
threshold (``baselines.otsu_mask``) on the same view. Two more rows at x1 show the whole-image view and native
pixels in tiles (scale 1: vessel Dice at native resolution for fundus photographs).

A third figure per row separates what the scale costs from what the view holds: the model's own x1 mask cut (or
tiled) like the view, scored against the view's mask (``x1_cut``). It is what a model that repeated its x1 result at
every magnification would score, so the drop from x1 to it is the view's share (a crop keeps the cut edges of
nuclei and whatever its labels leave out, in a larger share of its pixels) and the drop from it to the row's own
Dice is the scale's.

:func:`scale_tables` is the entry point (``esp-medsam evaluate`` and the main job's summary call it) and
:func:`scale_table_markdown` writes its result as Markdown.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..metrics.functional import dice_score, mean_dice
from ..models.esp_medsam.prediction import predict
from .baselines import otsu_mask
from .domains import MODALITY_NAMES
from .left_out import MARGIN, grown, left_out_scores, left_out_summary
from .schema import image_to_rgb, mask_to_bool

logger = logging.getLogger(__name__)

ZOOMS = (0.5, 1.0, 2.0, 4.0)
"""The magnifications of the table: x0.5 is a 2x2 mosaic, x2 and x4 centre crops of 1/2 and 1/4 of the side."""
EXTRA_VIEWS = (("x1, whole view", 1.0, "whole"), ("x1, native pixels in tiles", 1.0, 1.0))
"""Rows beside the default scale: (label, zoom, scale given to ``predict``)."""
SCALE_TABLE_MODALITIES = ("microscopy", "fundus")
"""Domains whose images hold many objects, measured by default: nuclei (any zoom) and vessels."""


def check_zoom(zoom: float) -> None:
    """Refuse (``ValueError``) a zoom :func:`zoom_view` cannot show: 0.5 (a mosaic) or at least 1 (a crop)."""
    if zoom != 0.5 and not (zoom >= 1.0 and math.isfinite(zoom)):
        raise ValueError(f"zoom must be 0.5 or at least 1, got {zoom!r}")


def zoom_view(image: np.ndarray, mask: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (HxW[xC]) and ``mask`` (HxW) shown at ``zoom``: 0.5 tiles them 2x2 (objects half their size in a
    frame twice as large), 1 returns them, a zoom above 1 crops the centre ``1/zoom`` of each side."""
    if zoom == 0.5:
        reps = (2, 2) + (1,) * (image.ndim - 2)
        return np.tile(image, reps), np.tile(mask, (2, 2))
    check_zoom(zoom)
    if zoom == 1.0:
        return image, mask
    height, width = mask.shape[:2]
    crop_h, crop_w = max(1, round(height / zoom)), max(1, round(width / zoom))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w], mask[top : top + crop_h, left : left + crop_w]


def _row(model, processor, pairs: Sequence[tuple[np.ndarray, np.ndarray]], modality: str, zoom: float, scale: Any,
         backend: str | None, progress: bool = False) -> dict:
    """Mean Dice (%) of the model and of Otsu over ``pairs`` at ``zoom``, and the scales ``predict`` used."""
    from tqdm.auto import tqdm

    ours, otsu, scales, masks = [], [], [], []
    for image, mask in tqdm(pairs, desc=f"scale table x{zoom:g}", unit="img", disable=not progress, leave=False):
        view, reference = zoom_view(image, mask, zoom)
        prediction = predict(model, processor, [view], modality, backend=backend, scale=scale)
        ours.append(dice_score(prediction.masks[0], reference))
        otsu.append(dice_score(otsu_mask(view, modality), reference))
        scales.append(prediction.scales[0])
        masks.append(prediction.masks[0])
    return {"zoom": zoom, "dice": mean_dice(ours), "otsu": mean_dice(otsu), "per_image": ours, "scales": scales,
            "masks": masks}


def _dont_care(pairs: Sequence[tuple[np.ndarray, np.ndarray]], masks: Sequence[np.ndarray] | None,
               bodies: Sequence[np.ndarray], zoom: float) -> dict:
    """``left_out.left_out_summary`` of ``masks`` (a view's, ``None`` when not at hand) against ``zoom``'s views of
    the references, with ``zoom``'s views of the grown left-out ``bodies`` as don't care."""
    if masks is None:
        return {"dice_dont_care": None, "false_positive_share": None}
    scores = []
    for (_, mask), body, prediction in zip(pairs, bodies, masks, strict=True):
        body_view, reference = zoom_view(body, mask, zoom)
        scores.append(left_out_scores(prediction, reference, body_view))
    return left_out_summary(scores)


def _x1_cut(pairs: Sequence[tuple[np.ndarray, np.ndarray]], x1_masks: Sequence[np.ndarray], zoom: float) -> float:
    """Mean Dice (%) of the x1 masks cut like ``zoom``'s view against the view's masks (module docstring)."""
    return mean_dice([dice_score(*zoom_view(cut, mask, zoom)) for (_, mask), cut in zip(pairs, x1_masks, strict=True)])


def _same_view(row: Mapping[str, Any], zoom: float, scale: Any) -> bool:
    """Whether ``row`` (measured at the model's default scale) is ``zoom``'s view at ``scale``: the default scale
    itself (``None``), or a factor ``scale`` that it segmented every image at (the same tiles, so the same masks)."""
    if scale is None:
        return row.get("zoom") == zoom and row.get("scale") == "default"
    return (isinstance(scale, float) and row.get("zoom") == zoom and bool(row.get("scales"))
            and all(used is not None and math.isclose(used, scale) for used in row["scales"]))


def scale_table(
    model, processor, pairs: Sequence[tuple[np.ndarray, np.ndarray]], modality: str, *,
    zooms: Iterable[float] = ZOOMS, scale: Any = None, extra_views: bool = True, backend: str | None = "eager",
    known: Sequence[Mapping[str, Any]] = (), x1_masks: Sequence[np.ndarray] | None = None,
    left_out: tuple[str, Sequence[np.ndarray]] | None = None, margin: int = MARGIN, progress: bool = False,
) -> dict:
    """The table for ``pairs`` of (RGB image, bool mask) decoded with ``modality`` (a name).

    Returns ``{"modality", "num_images", "left_out", "margin", "rows": [{"label", "zoom", "scale", "dice", "otsu",
    "x1_cut", "per_image", "scales"}]}``: one row per zoom with ``scale`` (``None``: the model's default), then
    ``EXTRA_VIEWS`` when ``extra_views``. Dice in %, means over the images (``metrics.functional.mean_dice``).
    ``known``: rows already measured on the same images at the default scale (the evaluation's x1); an extra view
    that its images were all segmented at is taken from it instead of run again. ``x1_cut`` (module docstring)
    scores ``x1_masks``, the model's masks of the images at x1 and the table's ``scale``, or, when not given, those
    of the x1 row when the table measures one; ``None`` without either. ``left_out``: ``(what, masks)`` of bodies
    the masks leave out on purpose (``real.left_out_masks``); each row then gains ``dice_dont_care`` and
    ``false_positive_share`` (``data.left_out``, the bodies grown by ``margin`` px; ``None`` for a row taken from
    ``known`` without ``x1_masks``). ``progress``: a bar per view.
    """
    if modality not in MODALITY_NAMES:
        raise ValueError(f"modality must be one of {', '.join(MODALITY_NAMES)}, got {modality!r}")
    bodies = _grown_bodies(pairs, left_out, margin)
    was_training = model.training
    model.eval()
    views = [(f"x{zoom:g}", float(zoom), scale) for zoom in zooms]
    views += list(EXTRA_VIEWS) if extra_views else []
    rows = []
    try:
        for label, zoom, view_scale in views:
            same = next((row for row in known if _same_view(row, zoom, view_scale)), None)
            row = ({key: same[key] for key in ("zoom", "dice", "otsu", "per_image", "scales")} if same is not None
                   else _row(model, processor, pairs, modality, zoom, view_scale, backend, progress))
            if x1_masks is None and zoom == 1.0 and view_scale == scale and "masks" in row:
                x1_masks = row["masks"]
            entry = {"label": label, "scale": "default" if view_scale is None else view_scale,
                     **{key: value for key, value in row.items() if key != "masks"}}
            if bodies is not None:  # a known row is the x1 view, whose masks x1_masks are
                entry.update(_dont_care(pairs, row.get("masks", x1_masks), bodies, zoom))
            rows.append(entry)
            logger.info("scale table %s %s: Dice %.2f%% (Otsu %.2f%%)", modality, label, row["dice"], row["otsu"])
    finally:
        model.train(was_training)
    for row in rows:
        row["x1_cut"] = None if x1_masks is None else _x1_cut(pairs, x1_masks, row["zoom"])
    return {"modality": modality, "num_images": len(pairs), "left_out": None if left_out is None else left_out[0],
            "margin": margin, "rows": rows}


def _grown_bodies(pairs: Sequence[tuple[np.ndarray, np.ndarray]], left_out: tuple[str, Sequence[np.ndarray]] | None,
                  margin: int) -> list[np.ndarray] | None:
    """The left-out masks of ``left_out`` grown by ``margin`` px, checked against ``pairs``; ``None`` without."""
    if left_out is None:
        return None
    masks = left_out[1]
    if len(masks) != len(pairs):
        raise ValueError(f"left_out holds {len(masks)} masks for {len(pairs)} images")
    for (_, mask), body in zip(pairs, masks):
        if body.shape != mask.shape:
            raise ValueError(f"a left-out mask of shape {body.shape} beside a mask of shape {mask.shape}")
    return [grown(body, margin) for body in masks]


def dataset_pairs(dataset) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """(image, mask) pairs of a Dataset in the package schema, and its modality name (its first row's)."""
    pairs = [(image_to_rgb(row["image"]), mask_to_bool(row["mask"])) for row in dataset]
    modality = MODALITY_NAMES[dataset[0]["modality"]] if len(dataset) else ""
    return pairs, modality


def scale_tables(
    model, processor, datasets: Mapping[str, Any], *, split: str = "test", names: Sequence[str] | None = None,
    scale: Any = None, backend: str | None = "eager", max_images: int | None = None,
) -> dict[str, dict]:
    """:func:`scale_table` for each dataset of ``datasets`` ({name: Dataset or DatasetDict}, ``split`` taken from
    a DatasetDict), as ``evaluate_model`` takes them. ``names``: which (default: those whose modality is in
    ``SCALE_TABLE_MODALITIES``); ``max_images`` per dataset. A domain whose masks leave bodies out on purpose
    (``real.left_out_masks``: mnfinder's micronuclei) is scored with them as don't care too. Returns
    ``{name: table}``."""
    from .real import left_out_masks

    tables = {}
    for name, data in datasets.items():
        dataset = data[split] if hasattr(data, "keys") and not hasattr(data, "features") else data
        if max_images is not None:
            dataset = dataset.select(range(min(max_images, len(dataset))))
        if not len(dataset):
            continue
        modality = MODALITY_NAMES[dataset[0]["modality"]]
        if (names is not None and name not in names) or (names is None and modality not in SCALE_TABLE_MODALITIES):
            continue
        pairs, modality = dataset_pairs(dataset)
        tables[name] = scale_table(model, processor, pairs, modality, scale=scale, backend=backend,
                                   left_out=left_out_masks(name, dataset["file_name"]))
    return tables


def scale_table_summary(tables: Mapping[str, dict]) -> dict[str, dict]:
    """The tables without their per-image figures, as a run's summary keeps them."""
    return {name: {"modality": table["modality"], "images": table["num_images"],
                   "left_out": table.get("left_out"),
                   "rows": [{key: row.get(key) for key in ("label", "scale", "dice", "otsu", "x1_cut", "scales")
                             + (("dice_dont_care", "false_positive_share") if table.get("left_out") else ())}
                            for row in table["rows"]]}
            for name, table in tables.items()}


def _scales_text(scales: Sequence[float | None]) -> str:
    tiled = [s for s in scales if s is not None]
    if not tiled:
        return "whole view"
    low, high = min(tiled), max(tiled)
    whole = len(scales) - len(tiled)
    text = f"x{low:.2g}" if math.isclose(low, high, rel_tol=0.05) else f"x{low:.2g}-x{high:.2g}"
    return text + (f" ({len(tiled)}), whole view ({whole})" if whole else "")


def scale_table_markdown(tables: Mapping[str, dict]) -> str:
    """The tables as Markdown: per dataset, Dice % of the model and of Otsu at each view, and the scales used."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines, left_out = [], {}
    for name, table in tables.items():
        what = table.get("left_out")
        if what:
            left_out[what] = table.get("margin", MARGIN)
        lines += [
            f"### {name}: Dice at other magnifications ({table['num_images']} image(s), {table['modality']})",
            "",
            "| shown at | scale asked | Dice % (ours) | Dice % (Otsu) | Dice % (our x1 mask, cut like the view) "
            + (f"| Dice % (ours, {what} don't care) " if what else "") + "| scale used (native px x) |",
            "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if what else "") + " --- |",
        ]
        for row in table["rows"]:
            asked = row["scale"] if isinstance(row["scale"], str) else f"{row['scale']:g}"
            dont_care = f"{number(row.get('dice_dont_care'))} | " if what else ""
            lines.append(f"| {row['label']} | {asked} | {row['dice']:.2f} | {row['otsu']:.2f} | "
                         f"{number(row.get('x1_cut'))} | {dont_care}{_scales_text(row['scales'])} |")
        lines.append("")
    if lines:
        lines += ["x0.5: a 2x2 mosaic of the image; x2, x4: centre crops of 1/2 and 1/4 of the side. 'default': the "
                  "model's saved scale (automatic unless set). 'Our x1 mask, cut like the view': the model's mask of "
                  "the whole image at x1, cropped (or tiled) like the view and scored against the view's mask: what a "
                  "model that repeated its x1 result at every magnification would score, so x1 minus it is the view's "
                  "share of a drop and it minus the row's Dice the scale's."
                  + "".join(f" '{what} don't care': our masks scored with the {what} that the dataset's masks leave "
                            f"out on purpose (grown by {margin} px) counting in neither mask (data.left_out)."
                            for what, margin in left_out.items()), ""]
    return "\n".join(lines)


__all__ = ["EXTRA_VIEWS", "ZOOMS", "check_zoom", "dataset_pairs", "scale_table", "scale_table_markdown",
           "scale_table_summary", "scale_tables", "zoom_view"]
