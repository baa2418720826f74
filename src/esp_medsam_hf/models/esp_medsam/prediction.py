"""Segmenting a batch of images, the one front door of inference: ``predict`` runs processor -> backend ->
post-processing, on the whole image or on overlapping tiles at a chosen scale, and gives a ``Prediction``.
Ships with saved models as remote code.

Scales (``scale=``, default the image processor's ``inference_scale``, "auto" unless saved otherwise):

- ``"whole"``: the whole image resized into the model's input (aspect kept and padded unless the image processor
  says ``keep_aspect_ratio=False``): one forward per image, as the model was originally used.
- a zoom factor (``2``, ``0.5``, ``1`` = native pixels): the image is resized by the factor and cut into
  overlapping tiles of ``tile_size`` px (default the model's input size) that overlap by ``overlap`` px (default a
  eighth of a tile); the tiles' logits are blended with Gaussian weights (MONAI's ``sliding_window_inference``).
  The model's input has a fixed size, so a tile of another size is resized to it: the model then sees the image
  at ``factor * model size / tile_size``.
- an object size ``"<n>px"`` (e.g. ``"30px"``): the objects are about n px across in the image; the factor brings
  them to the image processor's ``object_size`` (the size the model learnt, in its input's pixels).
- ``"auto"``: a coarse whole-image pass first; its mask's connected components give the objects' size
  (``object_sizes.estimate_object_size``) and :func:`choose_scale` rescales when it lies outside what the model
  handles (a factor ``AUTO_TOLERANCE`` away from ``object_size``). Only a modality with its own calibrated object size
  (``modality_object_sizes``: many small objects, such as nuclei, seen at a range of sizes in training) is zoomed
  out below the whole view, however few its large objects (a close-up); elsewhere large structures (an organ, a
  polyp, a blob over a fundus photograph) keep the whole view, which already shows the whole image. In a modality
  with its own object size, a factor within that tolerance of the native pixels is taken as the native pixels, which
  need no resampling (measured in :func:`choose_scale`). An empty coarse
  mask keeps the whole view. The rule uses no image statistic but the model's own mask, so it carries to images from labs
  never seen. A modality trained on native-resolution crops (``modality_long_sides``: fundus photographs, whose thin
  vessels a whole view shrinks away) is instead tiled at the resolution it was trained at: the image is resized so
  that its longest side is that modality's long side (its training images' median longest side at the centre of the
  trained zoom range), whatever camera took it, and no coarse pass is needed when the modality is given.

Small bodies: in a modality of ``modality_min_object_fractions`` (stage 3 sets a third for the nuclei), the mask
loses each connected body narrower than that fraction of the image's typical object width
(``object_sizes.remove_small_bodies``, widths as ``estimate_object_size`` measures them), unless it touches the
image's border. Nucleus masks leave micronuclei out, and a model that learnt nuclei at every size from 6 to 40 px
has no size cue of its own to tell a micronucleus in a close-up from a nucleus; measured against the rest of the
same image, it has one at any magnification.

Why MONAI's ``sliding_window_inference``: it is the field's maintained implementation of tiling with blended
overlaps (Gaussian importance map, batched windows, padding of small inputs); its per-window bookkeeping is cheap
next to a forward (docs/benchmark.md measures the whole tiled path against the tiles' own forwards). The image is
padded at the bottom and right here (as the image processor pads) before MONAI sees it, so a single tile holds
exactly the whole-image input and reproduces the whole-image forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .backends import inference_batch_size, resolve_backend, run_inference
from .object_sizes import estimate_object_size, remove_small_bodies

logger = logging.getLogger(__name__)

SCALE_MODES = ("auto", "whole")
AUTO_TOLERANCE = 1.5
""""auto" keeps the whole view while the estimated object size is within this factor of ``object_size``."""
AUTO_ZOOM_RANGE = (0.25, 8.0)
""""auto" changes the objects' size in the model's input by at most these factors."""
MAX_ZOOM = 4.0
"""Largest enlargement of the native pixels any scale uses (beyond it there is no detail to gain)."""
DEFAULT_OVERLAP_DIVISOR = 8
"""The default overlap of neighbouring tiles is ``tile_size // 8`` (32 px of a 256-px tile). Measured against a
quarter tile (MONAI's default) with the main job's model: mnfinder's 3 validation and 9 training images at x1 94.98
against 95.06 % Dice in 17 % less time, the 4 training fundus photographs at native pixels 52.58 against 49.86 %
(less Gaussian blending of thin vessels across tiles)."""
MAX_TILES = 64
"""Largest number of tiles per image (8 x 8: a 1600-px square at 256-px tiles with the default overlap); a larger
request is reduced to the largest factor that fits (logged)."""


@dataclass
class Prediction:
    """What :func:`predict` gives for a batch: a mask per image and what the modality classifier said."""

    masks: list[np.ndarray]
    """HxW bool masks, each at its image's size."""
    modality: list[int]
    """The modality index each image was decoded with: the given one, else the classifier's choice."""
    modality_logits: torch.Tensor | None
    """(B, M) float32 classifier logits on the CPU; ``None`` for a model without a classifier (the teacher)."""
    logits: list[torch.Tensor] = field(default_factory=list)
    """HxW float32 mask logits per image at its size (``masks`` is ``logits`` above the modality's threshold)."""
    scales: list[float | None] = field(default_factory=list)
    """Zoom factor of the native pixels each image was segmented at (tiled), or ``None`` for the whole view."""
    object_sizes: list[float | None] = field(default_factory=list)
    """"auto": the objects' size (px across, native pixels) the coarse pass estimated; else ``None``."""

    def item(self, index: int) -> "Prediction":
        """The prediction of the batch's ``index``-th image alone, as ``predict`` gives it for a batch of one."""
        return Prediction(
            masks=[self.masks[index]], modality=[self.modality[index]],
            modality_logits=None if self.modality_logits is None else self.modality_logits[index : index + 1],
            logits=self.logits[index : index + 1], scales=self.scales[index : index + 1],
            object_sizes=self.object_sizes[index : index + 1])

    @property
    def classifier_modality(self) -> list[int | None]:
        """The modality the classifier picks for each image, whatever modality was given."""
        if self.modality_logits is None:
            return [None] * len(self.masks)
        return self.modality_logits.argmax(-1).tolist()

    @property
    def modality_probabilities(self) -> list[list[float]] | None:
        """The classifier's probability of each modality, per image (``None`` without a classifier)."""
        if self.modality_logits is None:
            return None
        return self.modality_logits.softmax(-1).tolist()


@dataclass(frozen=True)
class TilingOptions:
    """Checked inference options: ``mode`` "auto", "whole", "factor" or "object" with its ``value`` (the factor,
    or the objects' size in native px), the tile size and overlap in px, and the object size the model learnt
    (``modality_object_sizes``: per modality name, replacing it); ``object_domain``: the options are those of a
    modality with its own calibrated object size (see :meth:`for_modality`); ``long_side``: "auto" tiles the image
    with its longest side at this many pixels (a modality of ``modality_long_sides``)."""

    mode: str
    value: float | None
    tile_size: int
    overlap: int
    object_size: float
    model_size: int
    modality_object_sizes: dict[str, float] = field(default_factory=dict)
    object_domain: bool = False
    modality_long_sides: dict[str, float] = field(default_factory=dict)
    long_side: float | None = None

    def for_modality(self, name: str | None) -> "TilingOptions":
        """These options for modality ``name``: with its own object size if it has one (an ``object_domain``). Its
        objects are small ones seen at many sizes in training (nuclei), so "auto" zooms out one or two large objects
        in a view (a close-up of them, not an organ). Measured on mnfinder's training and validation images at x4
        (centre crops of a quarter of the side): a crop holding two nuclei went from 77.9 to 95.8 % Dice, the mean
        from 93.05 to 93.55 %, and no x2 view changed. (Measuring a small image's objects at its native pixels
        instead of enlarged into the input was tried too: 93.45 % on the same views, so it is not done.)"""
        if name in self.modality_long_sides:
            return replace(self, long_side=self.modality_long_sides[name])
        if name not in self.modality_object_sizes:
            return self
        return replace(self, object_size=self.modality_object_sizes[name], object_domain=True)


def parse_scale(scale: Any) -> tuple[str, float | None]:
    """``"auto"``/``"whole"`` -> (mode, None); a positive number or numeric string -> ("factor", f); ``"<n>px"`` ->
    ("object", n). Anything else raises ``ValueError`` naming ``scale``."""
    expected = "expected 'auto', 'whole', a positive zoom factor (e.g. 2) or an object size such as '30px'"
    if isinstance(scale, str):
        text = scale.strip().lower()
        if text in SCALE_MODES:
            return text, None
        mode, number = ("object", text[:-2]) if text.endswith("px") else ("factor", text)
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"scale: {expected}, got {scale!r}") from None
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        mode, value = "factor", float(scale)
    else:
        raise ValueError(f"scale: {expected}, got {scale!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"scale must be positive and finite ({expected}), got {scale!r}")
    return mode, value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer (pixels), got {value!r}")
    return int(value)


def tiling_options(image_processor, scale: Any = None, tile_size: int | None = None,
                   overlap: int | None = None) -> TilingOptions:
    """The checked options: each argument, else the image processor's saved default (``inference_scale``,
    ``tile_size``, ``tile_overlap``; ``tile_size`` defaults to the model's input size and ``overlap`` to an eighth
    of a tile). Raises ``ValueError`` naming the argument for zero/negative sizes or ``overlap >= tile_size``."""
    size = image_processor.size
    model_size = int(size["height"] if isinstance(size, dict) else size.height)
    mode, value = parse_scale(scale if scale is not None else getattr(image_processor, "inference_scale", "whole"))
    tile = tile_size if tile_size is not None else getattr(image_processor, "tile_size", None) or model_size
    tile = _positive_int("tile_size", tile)
    overlap = overlap if overlap is not None else getattr(image_processor, "tile_overlap", None)
    overlap = tile // DEFAULT_OVERLAP_DIVISOR if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be an integer number of pixels with 0 <= overlap < tile_size ({tile}), "
                         f"got {overlap!r}")
    object_size = _object_size("object_size", getattr(image_processor, "object_size", 16.0))
    per_modality = getattr(image_processor, "modality_object_sizes", None) or {}
    if not isinstance(per_modality, dict):
        raise ValueError(f"modality_object_sizes must map modality names to sizes, got {per_modality!r}")
    sizes = {str(name): _object_size(f"modality_object_sizes[{name!r}]", size) for name, size in per_modality.items()}
    long_sides = getattr(image_processor, "modality_long_sides", None) or {}
    if not isinstance(long_sides, dict):
        raise ValueError(f"modality_long_sides must map modality names to pixels, got {long_sides!r}")
    sides = {str(name): float(_positive_int(f"modality_long_sides[{name!r}]", side)) for name, side in long_sides.items()}
    return TilingOptions(mode, value, tile, int(overlap), object_size, model_size, sizes, modality_long_sides=sides)


def _object_size(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    return float(value)


def min_object_fraction(image_processor, name: str | None) -> float:
    """The fraction of modality ``name``'s typical object width below which :func:`predict` removes a body: the
    image processor's ``modality_min_object_fractions`` entry, else 0 (nothing removed). Raises ``ValueError`` for
    a value outside [0, 1)."""
    value = (getattr(image_processor, "modality_min_object_fractions", None) or {}).get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < 1:
        raise ValueError(f"modality_min_object_fractions[{name!r}] must be a number in [0, 1) (a fraction of the "
                         f"typical object width), got {value!r}")
    return float(value)


def choose_scale(size: float, count: int, view_factor: float, object_size: float,
                 zoom_out: bool = False) -> float | None:
    """"auto": the zoom factor of the native pixels that brings objects of ``size`` px (in the whole view, made at
    ``view_factor``) to ``object_size``, or ``None`` to keep the whole view (see the module docstring). Objects
    larger than ``object_size`` are zoomed out only with ``zoom_out`` (a modality with its own calibrated object
    size): elsewhere the whole view already shows the whole image, and shrinking it further only puts it in a
    corner of the input (a fundus photograph whose coarse mask held large blobs went to x0.12 and came out as one
    blob over the whole retina). In such a modality a factor within ``AUTO_TOLERANCE`` of the native pixels is
    taken as the native pixels (1), whole view or not: any resampling smooths the pixels' noise and edges, and on
    images from labs the model never saw it was more accurate unresampled. Measured with the release of the main
    job of 7438f51 (Dice points against the choice before this rule): the DSB 2018 image (a lab not in training)
    x0.5/x1/x2/x4 +1.07/+0.81/+0.16/+2.93; mnfinder test +1.09 at x4 (its MCC13 images, a cell line not in
    training, up to +9.9), +0.12 at x1, -0.13 at x0.5, -0.02 at x2; its 3 validation images +0.08 at x4 and +0.10
    at x1; its 30 training images, which the model learnt at resampled views, -0.17 at x4 and -0.20 at x1. An MCC13
    crop resized by 1.04 and back, then segmented at native pixels, fell from 96.4 to 78.2."""
    if count == 0 or not math.isfinite(size) or size <= 0:
        return None
    ratio = object_size / size
    if zoom_out and 1.0 / AUTO_TOLERANCE <= view_factor * ratio <= AUTO_TOLERANCE:
        return 1.0
    if 1.0 / AUTO_TOLERANCE <= ratio <= AUTO_TOLERANCE or (ratio < 1.0 and not zoom_out):
        return None
    return view_factor * min(max(ratio, AUTO_ZOOM_RANGE[0]), AUTO_ZOOM_RANGE[1])


def _limit_factor(factor: float, height: int, width: int, options: TilingOptions) -> float:
    """``factor`` capped by ``MAX_ZOOM`` and by ``MAX_TILES`` tiles (logged when reduced)."""
    stride = options.tile_size - options.overlap
    most = (options.tile_size + (math.isqrt(MAX_TILES) - 1) * stride) / max(height, width)
    limited = min(factor, MAX_ZOOM, most)
    if limited < factor:
        logger.info("scale %.3g reduced to %.3g (at most x%g and %d tiles per image)", factor, limited, MAX_ZOOM,
                    MAX_TILES)
    return limited


def tiled_logits(
    model, image_processor, image: Any, original_size: Sequence[int], factor: float, modality: int,
    options: TilingOptions, backend: str | None = "eager", batch_size: int | None = None,
    target_index: int | None = None, int8: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One image of ``original_size`` (H, W) segmented at ``factor`` x its native pixels in overlapping tiles:
    (H x W float32 mask logits, (M,) classifier logits averaged over the tiles, ``None`` without a classifier).

    The image goes through ``image_processor`` at the rescaled size (the same resizing and normalisation as the
    whole view), is padded with zeros at the bottom and right to at least one tile, and MONAI's
    ``sliding_window_inference`` sends ``batch_size`` tiles per ``backends.run_inference`` call (default:
    ``backends.inference_batch_size`` of the device and backend) and blends their logits with Gaussian weights.
    Tiles larger or smaller than the model's input are resized to it and their logits back. ``target_index`` (a model's target, see
    ``predict``) decodes that target in every tile instead of ``modality``'s own; ``int8`` as in ``predict``.
    """
    from monai.inferers import sliding_window_inference

    device = next(model.parameters()).device
    height, width = (int(v) for v in original_size)
    target = (max(1, round(height * factor)), max(1, round(width * factor)))
    pixels = image_processor(images=[image], return_tensors=None, keep_aspect_ratio=False, do_pad=False,
                             size={"height": target[0], "width": target[1]})["pixel_values"][0]
    tile, size = options.tile_size, options.model_size
    padded = F.pad(pixels[None].float(), (0, max(0, tile - target[1]), 0, max(0, tile - target[0])))
    classifier: list[torch.Tensor] = []

    def forward(tiles: torch.Tensor) -> torch.Tensor:
        if tile != size:
            tiles = F.interpolate(tiles, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        index = torch.full((tiles.shape[0],), int(modality), dtype=torch.long)
        outputs = run_inference(model, tiles.to(device, model.dtype), index, backend=backend, target=target_index,
                                int8=int8, one_modality_graph=True)
        if outputs.modality_logits is not None:
            classifier.append(outputs.modality_logits.float().cpu())
        logits = F.interpolate(outputs.pred_masks.float().cpu(), size=(size, size), mode="bilinear",
                               align_corners=False)
        if tile != size:
            logits = F.interpolate(logits, size=(tile, tile), mode="bilinear", align_corners=False)
        return logits

    runs_on = "eager" if target_index is not None else resolve_backend(model, backend)  # targets run eagerly
    blended = sliding_window_inference(
        padded, roi_size=(tile, tile), sw_batch_size=batch_size or inference_batch_size(device, backend=runs_on),
        predictor=forward, overlap=options.overlap / tile, mode="gaussian", padding_mode="constant", cval=0.0,
    )
    logits = blended[:, :, : target[0], : target[1]]
    if (target[0], target[1]) != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0, 0], torch.cat(classifier).mean(0) if classifier else None


def _process(model, processor, images: Sequence[Any], modality: Any) -> Any:
    """``processor``'s inputs for ``images``: an ``EspMedSamProcessor`` maps the modality itself; with an image
    processor alone the model's config does (a name or index, or one per image)."""
    if getattr(processor, "image_processor", None) is not None:
        return processor(images=images, modality=modality, return_tensors="pt")
    inputs = processor(images=images, return_tensors="pt")
    if modality is not None:
        names = [modality] * len(images) if isinstance(modality, (str, int)) else list(modality)
        if len(names) != len(images):
            raise ValueError(f"got {len(names)} modalities for {len(images)} images")
        inputs["modality"] = torch.tensor([model.config.modality_index(m) for m in names], dtype=torch.long)
    return inputs


def _whole_view(model, processor, inputs, backend: str | None, target: int | None = None,
                int8: bool | None = None) -> tuple[list[torch.Tensor], Any]:
    """The whole-view forward of a processed batch: (HxW logits per image at its size, the backend's outputs)."""
    device = next(model.parameters()).device
    outputs = run_inference(model, inputs["pixel_values"].to(device), inputs.get("modality"), backend=backend,
                            target=target, int8=int8)
    logits = processor.post_process_masks(outputs.pred_masks.float().cpu(), inputs["original_sizes"], binarize=False)
    return logits, outputs


def _scale_of(options: TilingOptions, view_logits: torch.Tensor | None, view_factor: float,
              view_size: tuple[int, int]) -> tuple[float | None, float | None]:
    """(zoom factor of the native pixels or ``None`` for the whole view, estimated object size in native px).
    ``view_logits`` (the image's H x W = ``view_size``) came from a view of the image at ``view_factor`` x its
    native pixels (``None`` when no whole view ran: a given scale, or a modality with a long side).

    ``object_size`` is in the model's input pixels; a tile of ``tile_size`` px is resized to the model's input, so
    the factor of the tiled image is the factor the model sees times ``tile_size / model_size``."""
    to_tiles = options.tile_size / options.model_size
    if options.mode == "factor":
        return options.value, None
    if options.mode == "object":
        return options.object_size / options.value * to_tiles, None
    if options.mode == "whole":
        return None, None
    if options.long_side is not None:
        return options.long_side / max(view_size) * to_tiles, None
    height, width = view_logits.shape[-2:]
    view = (max(1, round(height * view_factor)), max(1, round(width * view_factor)))
    mask = F.interpolate(view_logits[None, None], size=view, mode="bilinear", align_corners=False)[0, 0] > 0
    size, count = estimate_object_size(mask.numpy())
    factor = choose_scale(size, count, view_factor, options.object_size, options.object_domain)
    return (None if factor is None else factor * to_tiles), (size / view_factor if count else None)


def _at_its_scale(model, image_processor, image: Any, size: tuple[int, int], view_logits: torch.Tensor | None,
                  modality: int, options: TilingOptions, backend: str | None, tile_batch_size: int | None,
                  target_index: int | None, int8: bool | None):
    """One image of ``size`` (H, W) at the scale ``options`` choose, from its whole view's ``view_logits`` (None when
    no whole view ran): (H x W logits, the zoom factor of the native pixels used or ``None`` for the whole view,
    the estimated object size or ``None``, the tiles' classifier logits or ``None``)."""
    height, width = size
    factor, object_size = _scale_of(options, view_logits, min(options.model_size / height, options.model_size / width),
                                    size)
    if factor is None:
        return view_logits, None, object_size, None
    factor = _limit_factor(factor, height, width, options)
    logits, mean = tiled_logits(model, image_processor, image, size, factor, modality, options, backend,
                                tile_batch_size, target_index, int8)
    return logits, factor, object_size, mean


def mask_threshold(image_processor, name: str | None) -> float:
    """The mask-logit threshold of modality ``name``: the image processor's ``modality_mask_thresholds`` entry
    (what stage 3 measured best on that modality's validation images), else 0. Raises ``ValueError`` for a value
    that is not a finite number."""
    value = (getattr(image_processor, "modality_mask_thresholds", None) or {}).get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"modality_mask_thresholds[{name!r}] must be a finite number (a mask logit), got {value!r}")
    return float(value)


def without_small_bodies(image_processor, mask: np.ndarray, name: str | None) -> np.ndarray:
    """``mask`` less the bodies narrower than modality ``name``'s :func:`min_object_fraction` of the typical object
    (``object_sizes.remove_small_bodies``)."""
    return remove_small_bodies(mask, min_object_fraction(image_processor, name))


def modality_mask(image_processor, logits: torch.Tensor | np.ndarray, name: str | None) -> np.ndarray:
    """Modality ``name``'s HxW bool mask from its ``logits``: above :func:`mask_threshold`, less its small bodies
    (:func:`without_small_bodies`)."""
    return without_small_bodies(image_processor, np.asarray(logits > mask_threshold(image_processor, name)), name)


def modality_name(model, index: int | None) -> str | None:
    """The name of modality ``index`` in ``model``'s config (``None`` without names or for an index out of range)."""
    names = getattr(model.config, "modality_names", None)
    return names[index] if names is not None and index is not None and 0 <= index < len(names) else None


def predict(
    model, processor, images: Sequence[Any], modality: Any = None, *, backend: str | None = "eager",
    scale: Any = None, tile_size: int | None = None, overlap: int | None = None, tile_batch_size: int | None = None,
    target: int | str | None = None, int8: bool | None = None,
) -> Prediction:
    """Segment a batch of images: ``processor`` -> ``model`` (whole view or tiles) -> post-processing.

    ``processor`` is an ``EspMedSamProcessor`` (or its image processor); ``modality`` is what it takes (a name or index for every image, or
    one per image), or ``None`` for the classifier to choose (on the whole view, then used for every tile). The
    pixels go through ``backends.run_inference`` with ``backend`` (``"eager"``: the PyTorch model; ``None``: the
    automatic choice). ``scale``, ``tile_size`` and ``overlap`` (pixels) are described in the module docstring;
    ``None`` takes the image processor's saved default (:func:`tiling_options`). ``tile_batch_size`` tiles go to
    the backend per call. Masks keep the logits above the image's modality's threshold (:func:`mask_threshold`:
    the image processor's ``modality_mask_thresholds``, else 0, probability 0.5), less the small bodies of a
    modality in ``modality_min_object_fractions`` (``object_sizes.remove_small_bodies``; the logits keep them).
    ``target`` (a name or index in ``model.config.all_target_names``) decodes that target for every image, whole
    view and tiles, instead of each image's modality's own; ``modality`` is then ignored (the target implies it).
    ``int8``: on the onnxruntime backend, the tiles and the "whole" view run on the int8 copy of the export
    (``None``: ``backends.resolve_int8``'s default; ``False``: the float32 export, bit for bit); a whole view that
    decides the scale ("auto") or the tiles' modality always runs in float32.
    """
    image_processor = getattr(processor, "image_processor", processor)
    options = tiling_options(image_processor, scale, tile_size, overlap)
    target_index = None if target is None else model.config.target_index(target)
    inputs = _process(model, processor, images, modality if target_index is None else None)
    sizes = [tuple(int(v) for v in size) for size in inputs["original_sizes"].tolist()]
    given = inputs.get("modality")
    if target_index is not None:
        given = torch.full((len(sizes),), model.config.target_modalities[target_index], dtype=torch.long)
    logits: list[torch.Tensor | None] = [None] * len(sizes)
    classifier: torch.Tensor | None = None
    chosen = given.tolist() if given is not None else None
    needs_view = options.mode == "whole" or given is None or (options.mode == "auto" and any(
        options.for_modality(modality_name(model, index)).long_side is None for index in chosen))
    if needs_view:
        # A whole view that decides (the scale of "auto", the modality of tiles) runs in float32, so that int8 never
        # changes which scale or bag an image is segmented with; only a final whole view ("whole") takes int8.
        view_int8 = int8 if options.mode == "whole" else False
        logits, outputs = _whole_view(model, image_processor, inputs, backend, target_index, view_int8)
        chosen = outputs.modality.tolist()
        classifier = None if outputs.modality_logits is None else outputs.modality_logits.float().cpu()
    scales, object_sizes, tile_classifier = [], [], []
    for index, size in enumerate(sizes):
        image_options = options.for_modality(modality_name(model, chosen[index]))
        logits[index], scale, object_size, mean = _at_its_scale(
            model, image_processor, images[index], size, logits[index], chosen[index], image_options, backend,
            tile_batch_size, target_index, int8)
        if scale is not None:
            tile_classifier.append(mean)
        scales.append(scale)
        object_sizes.append(object_size)
    if classifier is None and tile_classifier and all(t is not None for t in tile_classifier):
        classifier = torch.stack(tile_classifier)
    return Prediction(
        masks=[modality_mask(image_processor, item, modality_name(model, index)) for item, index in zip(logits, chosen)],
        modality=list(chosen), modality_logits=classifier, logits=list(logits), scales=scales,
        object_sizes=object_sizes,
    )


__all__ = [
    "Prediction",
    "SCALE_MODES",
    "TilingOptions",
    "choose_scale",
    "mask_threshold",
    "min_object_fraction",
    "modality_mask",
    "modality_name",
    "parse_scale",
    "predict",
    "tiled_logits",
    "tiling_options",
    "without_small_bodies",
]
