"""The object size that "auto" inference aims for, chosen on the validation images after training.

Training shows each object-size domain at sizes drawn log-uniformly from a range (``zoom: {object_size: [6, 40]}``),
and "auto" inference rescales an image so that its objects reach the image processor's ``object_size``. The middle
of the training range is a guess: Dice weighs a one-pixel boundary error less on a larger object, so a model is
often most accurate in the upper part of the range it learnt. Which size suits the trained model is measured, not
assumed: the validation images of those domains, shown at two magnifications (``scale_table.zoom_view``: centre
crops of 1/2 and 1/4 of the side, which "auto" rescales, as it does any image whose objects are off-size), are
segmented with each candidate size, and the smallest size whose mean Dice is within ``TOLERANCE`` points of the
best is saved with the release: a larger size means more tiles per image (the area grows with its square), so a
size that gains nothing measurable is not worth its time. The rule has a risk, measured: with two or three
validation images the candidates lie within a few tenths of a point, and in a cross-lab run (mnfinder's U2OS group
held out, 2 validation images) it chose 15.5 px, which shrank the held-out images to half their native pixels:
92.45 % on them against 94.21 % with the same weights at 25.1 px. Taking the best size instead was tried: the
main job then chose 32 px (96.34 against 96.17 % at 25.1), took 14.9 minutes of its 15 (13.1 at 25.1), and its
x4 crops fell from 89.03 to 86.69 % (more of them kept an enlarged whole view), so the cheaper rule stays. At the
chosen size, the same views then choose the
modality's mask-logit threshold (``modality_mask_thresholds``, which ``prediction.predict`` applies): SAM's 0
(probability 0.5) is where the loss balances the training masks' pixels, which need not be where Dice is best on
the model's upsampled low-resolution logits (in the main job the masks came out about a pixel too wide at 0). The
threshold closest to 0 within ``THRESHOLD_TOLERANCE`` points of the best wins. Then the same masks decide whether
bodies narrower than ``SMALL_BODY_FRACTION`` of the image's typical object width are removed from the modality's
masks (``modality_min_object_fractions``, ``object_sizes.remove_small_bodies``): yes unless that lowers their Dice by
more than ``THRESHOLD_TOLERANCE``. Only validation images are used; the test images never choose any of these.

A domain trained at a **scale** of its native pixels (``zoom: {scale: [0.5, 2]}``: fundus photographs, whose thin
vessels a whole view shrinks away) needs no search: "auto" tiles its modality at the resolution it was trained at,
the training images' median longest side times the geometric middle of the range (:func:`native_long_sides`,
saved as the image processor's ``modality_long_sides``), so that a photograph from another camera is brought to the
training photographs' resolution instead of being taken at its own pixels.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..data.scale_table import dataset_pairs, zoom_view
from ..metrics.functional import dice_score
from ..models.esp_medsam.object_sizes import remove_small_bodies
from ..models.esp_medsam.prediction import predict
from .augment import ZoomRange

logger = logging.getLogger(__name__)

CALIBRATION_ZOOMS = (2.0, 4.0)
"""The magnifications of each validation image the candidates are scored on."""
TOLERANCE = 0.25
"""Dice points (mean over the views) within which a smaller, cheaper size is preferred to the best."""
CANDIDATES = 4
"""Number of candidate sizes, log-spaced from the middle of the training range to 0.8 of its top."""
MASK_THRESHOLDS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""Candidate mask-logit thresholds (probabilities 0.27 to 0.88)."""
THRESHOLD_TOLERANCE = 0.05
"""Dice points within which the threshold closest to 0 is preferred to the best."""
SMALL_BODY_FRACTION = 1 / 3
"""Bodies narrower than this fraction of the typical object width are not objects of their own: the criterion by
which micronucleus scoring tells a micronucleus from a nucleus (at most a third of the main nucleus' diameter;
Fenech et al., HUMN project scoring criteria, 2003). Nucleus masks leave micronuclei out (mnfinder's mark them
apart), and a model that learnt nuclei at many sizes has no size cue of its own to leave them out in a close-up.
Fixed, not searched. The reference masks themselves hold few such bodies: removing them from mnfinder's training
masks takes 0.006 % of their pixels at x1, from the DSB 2018 image's 0.12 % (0.21 % in its 2x2 mosaic, whose seams
cut nuclei away from the frame), Dice 99.9 % or more at every zoom."""


def candidate_sizes(ranges: Sequence[ZoomRange], count: int = CANDIDATES) -> list[float]:
    """Log-spaced sizes from the geometric middle of the object-size ranges to 0.8 of their top (objects at the
    very top of the range would leave a view no margin to grow); one size if the range is a single value."""
    low = max(r.low for r in ranges)
    high = min(r.high for r in ranges)
    middle = math.sqrt(low * high)
    top = max(middle, 0.8 * high)
    if math.isclose(middle, top):
        return [round(middle, 1)]
    return [round(float(size), 1) for size in np.geomspace(middle, top, count)]


def calibrate_object_size(model, processor, data: Mapping[str, Mapping], zoom: Mapping[str, ZoomRange],
                          split: str = "validation", backend: str | None = None) -> dict | None:
    """Choose the image processor's ``object_size`` on ``split`` of the object-size domains of ``zoom``.

    Returns ``{"object_size", "modalities", "candidates": {size: mean Dice %}, "mask_threshold", "thresholds":
    {threshold: mean Dice % at the chosen size}, "images", "views"}``, or ``None``
    when no such domain has images in ``split``. The size is for those domains' modalities only (the image
    processor's ``modality_object_sizes``): another modality's objects (vessels, organs) keep their own. ``processor`` is left unchanged; the caller saves the chosen size. Ties go to
    the smaller size (the middle of the training range). ``backend``: as ``prediction.predict`` takes it (default the
    automatic choice, the path users take, whose onnxruntime export the evaluation of the same weights then reuses)."""
    ranges = {name: spec for name, spec in zoom.items() if spec.kind == "object_size"}
    pairs, modalities = [], []
    for name in ranges:
        if name in data and split in data[name] and len(data[name][split]):
            found, modality = dataset_pairs(data[name][split])
            pairs += found
            modalities += [modality] * len(found)
    if not pairs:
        logger.info("object size not calibrated: no %s images in %s", split, ", ".join(ranges) or "any domain")
        return None
    candidates = candidate_sizes(list(ranges.values()))
    views = [(zoom_view(image, mask, factor), modality) for (image, mask), modality in zip(pairs, modalities)
             for factor in CALIBRATION_ZOOMS]
    trial = copy.deepcopy(processor)
    trial.image_processor.modality_mask_thresholds = None  # sizes are compared at SAM's threshold, 0,
    trial.image_processor.modality_min_object_fractions = None  # and on the whole masks
    calibrated = sorted(set(modalities))
    scores, logits = {}, {}
    for size in candidates:
        trial.image_processor.modality_object_sizes = {
            **(processor.image_processor.modality_object_sizes or {}), **{name: size for name in calibrated}}
        found = [predict(model, trial, [view], modality, scale="auto", backend=backend) for (view, _), modality in views]
        scores[size] = float(np.mean([dice_score(item.masks[0], reference)
                                      for item, ((_, reference), _) in zip(found, views)]))
        logits[size] = [item.logits[0] for item in found]
        logger.info("object size %.1f px: validation Dice %.2f%% over %d views", size, scores[size], len(views))
    top = max(scores.values())
    best = min(size for size in candidates if scores[size] >= top - TOLERANCE)
    references = [reference for (_, reference), _ in views]
    thresholds = {cut: float(np.mean([dice_score(np.asarray(item > cut), reference)
                                      for item, reference in zip(logits[best], references)]))
                  for cut in MASK_THRESHOLDS}
    top = max(thresholds.values())
    cut = min((value for value in MASK_THRESHOLDS if thresholds[value] >= top - THRESHOLD_TOLERANCE), key=abs)
    logger.info("mask threshold at %.1f px: %s; chosen %g", best,
                ", ".join(f"{value:g}: {dice:.2f}%" for value, dice in thresholds.items()), cut)
    bodies = {fraction: float(np.mean([dice_score(remove_small_bodies(np.asarray(item > cut), fraction), reference)
                                       for item, reference in zip(logits[best], references)]))
              for fraction in (0.0, SMALL_BODY_FRACTION)}
    fraction = SMALL_BODY_FRACTION if bodies[SMALL_BODY_FRACTION] >= bodies[0.0] - THRESHOLD_TOLERANCE else 0.0
    logger.info("small bodies kept: %.2f%%, removed: %.2f%%; %s", bodies[0.0], bodies[SMALL_BODY_FRACTION],
                "removed" if fraction else "kept")
    return {"object_size": best, "modalities": calibrated, "candidates": scores, "mask_threshold": cut,
            "thresholds": thresholds, "min_object_fraction": fraction, "small_bodies": bodies,
            "images": len(pairs), "views": len(views)}


def native_long_sides(data: Mapping[str, Mapping], zoom: Mapping[str, ZoomRange], split: str = "train"
                      ) -> dict[str, int]:
    """``{modality name: pixels}`` for the modalities of ``zoom``'s scale domains with images in ``split``: the
    median longest side of those images times the geometric middle of the domains' scale range (the resolution
    their training crops showed on average)."""
    from ..data.domains import MODALITY_NAMES

    sides: dict[str, list[float]] = {}
    for name, spec in zoom.items():
        if spec.kind != "scale" or name not in data or split not in data[name] or not len(data[name][split]):
            continue
        rows = data[name][split]
        middle = math.sqrt(spec.low * spec.high)
        for row in rows:
            image = row["image"]  # a PIL image reads its size from the header: no pixels decoded
            side = max(image.size) if hasattr(image, "getbbox") else max(np.shape(image)[:2])
            sides.setdefault(MODALITY_NAMES[row["modality"]], []).append(side * middle)
    return {modality: int(round(float(np.median(values)))) for modality, values in sides.items()}


__all__ = ["CALIBRATION_ZOOMS", "CANDIDATES", "MASK_THRESHOLDS", "SMALL_BODY_FRACTION", "THRESHOLD_TOLERANCE",
           "TOLERANCE", "calibrate_object_size", "candidate_sizes", "native_long_sides"]
