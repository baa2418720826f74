"""Scale and photometric augmentation: crops of native-resolution images under random zoom, so that the model sees
its objects at many sizes in its input, and random gamma, contrast, blur and noise (with a halo of light beside the
objects on half the object-size domains' views: :class:`Halo`).

A domain's zoom is given either by the **object size** the crops should give in the model's input (``object_size:
[6, 40]``: nuclei 6 to 40 px across), measured per image from its mask as "auto" inference measures it
(:func:`object_size`), or by a **scale**
relative to the native pixels (``scale: [0.5, 2]``: for fundus vessels, which native-resolution inference sees at
scale 1). The scale of each crop is drawn log-uniformly, so every octave of object size is seen equally often.
A crop shows ``size / scale`` native pixels resized to the model input (antialiased bilinear, the image
processor's resampling); an image smaller than that at this scale is placed at a random position on a canvas of
the colour that the image processor's normalisation maps to 0 (inference pads its whole views and tiles with zeros
after normalisation), keeping its aspect ratio, as inference does. In the object-size domains a quarter of the
crops (``PARTIAL_VIEW_SHARE``) cover only part of the view, 30 % to 100 % of each side, on that canvas: an image
that is small for its objects' size (a user's crop, a zoomed-in field) reaches "auto" inference as a small patch on
zero padding, whatever the objects' size, and without these views training would show such a canvas only with the
smallest objects. Scale domains (fundus vessels) never get them: their native-scale tiles are always full, and
partial views of fundus photographs, whose black surround already borders the view, took the vessel Dice to 0. Half the crops are centred on a
foreground pixel, so that sparse objects are not mostly missed at high zoom (nnU-Net oversamples foreground for
the same reason). Randomness comes from the caller's generator, seeded by (seed, image, view) or (seed, epoch,
image), so runs and resumed runs see the same crops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.esp_medsam.object_sizes import estimate_object_size

ZOOM_KINDS = ("object_size", "scale")
PARTIAL_VIEW_SHARE = 0.25
"""Share of the object-size domains' zoom crops that fill only part of the view (each side 30 % to 100 % of it)."""
PARTIAL_VIEW_SIDES = (0.3, 1.0)


@dataclass(frozen=True)
class ZoomRange:
    """How a domain's training crops are zoomed: ``kind`` ``"object_size"`` (low/high: object diameters in input
    pixels, measured from the mask) or ``"scale"`` (low/high: input pixels per native pixel); ``crops``: how many
    crops of each of the domain's images an epoch shows (a large photograph holds many crops' worth of objects)."""

    kind: str
    low: float
    high: float
    crops: int = 1

    @classmethod
    def parse(cls, domain: str, spec: Mapping) -> "ZoomRange":
        """``{"object_size": [low, high]}`` or ``{"scale": [low, high]}``, optionally with ``"crops": N``;
        anything else is an error naming the domain."""
        kinds = [key for key in spec if key in ZOOM_KINDS] if isinstance(spec, Mapping) else []
        if len(kinds) != 1 or set(spec) - {kinds[0], "crops"}:
            raise ValueError(f"zoom[{domain!r}] must be {{object_size: [low, high]}} or {{scale: [low, high]}}, "
                             f"optionally with crops: N, got {spec!r}")
        kind = kinds[0]
        bounds = spec[kind]
        if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
                or not all(math.isfinite(b) and b > 0 for b in bounds) or bounds[0] > bounds[1]):
            raise ValueError(f"zoom[{domain!r}][{kind!r}] must be two finite numbers 0 < low <= high, got {bounds!r}")
        crops = spec.get("crops", 1)
        if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
            raise ValueError(f"zoom[{domain!r}]['crops'] must be an integer >= 1, got {crops!r}")
        return cls(kind, float(bounds[0]), float(bounds[1]), crops)

    def draw_scale(self, rng: np.random.Generator, reference_size: float) -> float:
        """A scale drawn log-uniformly; for ``object_size``, relative to the image's object size in native px."""
        value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return value / reference_size if self.kind == "object_size" else value


def parse_zoom(zoom: Mapping[str, Mapping] | None) -> dict[str, ZoomRange]:
    """``{domain: ZoomRange}`` from a configuration's ``zoom`` option (checked)."""
    if zoom is None:
        return {}
    if not isinstance(zoom, Mapping):
        raise ValueError(f"zoom must map domain names to {{object_size|scale: [low, high]}}, got {zoom!r}")
    return {str(domain): ZoomRange.parse(str(domain), spec) for domain, spec in zoom.items()}


def crops_per_epoch(zoom: Mapping[str, Mapping] | None) -> dict[str, int]:
    """``{domain: crops}`` of the zoom domains whose epochs show more than one crop of each image."""
    return {name: spec.crops for name, spec in parse_zoom(zoom).items() if spec.crops > 1}


def object_size(mask: np.ndarray) -> float:
    """The objects' size in a mask's pixels as "auto" inference measures it (``object_sizes.estimate_object_size``:
    the area-weighted median width of the connected components), so that the sizes asked in training and the
    size inference aims for (the image processor's ``object_size``) are one measure; ``nan`` without objects."""
    return estimate_object_size(mask)[0]


def _resize(array: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) float -> (C, h, w), bilinear, antialiased, pixel centres aligned (the image processor's resize)."""
    if tuple(array.shape[-2:]) == size:
        return array
    return F.interpolate(array[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _crop_origin(rng: np.random.Generator, mask: np.ndarray, extent: tuple[int, int],
                 foreground_share: float) -> tuple[int, int]:
    """Top-left corner of a crop of ``extent`` native pixels: centred on a random foreground pixel with probability
    ``foreground_share``, else uniform."""
    height, width = mask.shape
    span_y, span_x = height - extent[0], width - extent[1]
    if rng.random() < foreground_share:
        ys, xs = np.nonzero(mask)
        if ys.size:
            pick = int(rng.integers(ys.size))
            return (int(np.clip(ys[pick] - extent[0] // 2, 0, span_y)), int(np.clip(xs[pick] - extent[1] // 2, 0,
                                                                                   span_x)))
    return int(rng.integers(span_y + 1)), int(rng.integers(span_x + 1))


def zoom_crop(image: np.ndarray, mask: np.ndarray, scale: float, size: int, rng: np.random.Generator,
              foreground_share: float = 0.5, fill: tuple[int, int, int] = (0, 0, 0),
              field: tuple[float, float] = (1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` view of ``image`` (H x W x 3 uint8) and ``mask`` (H x W bool) at ``scale`` input pixels
    per native pixel, with a random horizontal and vertical flip. The crop covers ``field`` (height, width shares)
    of the view's sides; where it, or the scaled image, is smaller than ``size`` it sits at a random position on a
    canvas of colour ``fill``. The mask is resized like the image processor's labels (the share of foreground under
    each new pixel, kept at >= 0.5)."""
    height, width = mask.shape
    extent = (min(height, max(1, round(size * field[0] / scale))), min(width, max(1, round(size * field[1] / scale))))
    top, left = _crop_origin(rng, mask, extent, foreground_share)
    window = (slice(top, top + extent[0]), slice(left, left + extent[1]))
    out = (min(size, max(1, round(extent[0] * scale))), min(size, max(1, round(extent[1] * scale))))
    pixels = _resize(torch.from_numpy(np.ascontiguousarray(image[window])).permute(2, 0, 1).float(), out)
    share = _resize(torch.from_numpy(np.ascontiguousarray(mask[window])).float()[None], out)
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    labels = np.zeros((size, size), bool)
    y, x = int(rng.integers(size - out[0] + 1)), int(rng.integers(size - out[1] + 1))
    canvas[y : y + out[0], x : x + out[1]] = pixels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    labels[y : y + out[0], x : x + out[1]] = share[0].numpy() >= 0.5
    if rng.random() < 0.5:
        canvas, labels = canvas[:, ::-1], labels[:, ::-1]
    if rng.random() < 0.5:
        canvas, labels = canvas[::-1], labels[::-1]
    return np.ascontiguousarray(canvas), np.ascontiguousarray(labels)


@dataclass(frozen=True)
class Photometric:
    """Random intensity changes of a training view (each drawn per view): gamma log-uniform in ``gamma``, contrast
    about the mean in ``contrast``, Gaussian blur of sigma up to ``blur`` input px (half the views), Gaussian noise
    of sd up to ``noise`` of the range (half the views). They stand for other microscopes, stains and cameras."""

    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.7, 1.3)
    blur: float = 1.2
    noise: float = 0.04

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        values = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        values = values ** math.exp(rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))
        values = (values - values.mean()) * rng.uniform(*self.contrast) + values.mean()
        if self.blur > 0 and rng.random() < 0.5:
            values = _blur(values, rng.uniform(0.3, self.blur))
        if self.noise > 0 and rng.random() < 0.5:
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            values = values + rng.uniform(0, self.noise) * torch.randn(values.shape, generator=generator)
        return (values.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class Halo:
    """Light beside the objects that is not theirs, on a share of an object-size domain's views: in fluorescence
    microscopy the cytoplasm glows faintly in the nuclear channel (another channel's bleed-through,
    autofluorescence, out-of-focus light), and a cell line none of whose images were trained on (mnfinder's MCC13,
    its cytoplasm in the DAPI channel) had the model marking that glow as nucleus. Brightness falls off with the
    distance from the objects over ``reach`` object sizes, is broken up by a smooth random field (cytoplasm is not a
    ring), and peaks at ``strength`` of the objects' mean brightness above the background; it adds over the objects
    too (light from above and below them), so their edges keep their contrast and no dark rim marks them. The
    labels stay the objects'. Drawn per view (probability ``share``) from the caller's generator."""

    share: float = 0.5
    reach: tuple[float, float] = (0.3, 1.2)
    strength: tuple[float, float] = (0.15, 0.5)

    def __call__(self, image: np.ndarray, mask: np.ndarray, size: float, rng: np.random.Generator) -> np.ndarray:
        """``image`` (H x W x 3 uint8) with a halo around ``mask``'s objects of ``size`` px across (as given when
        the view draws none, has no object or no background, or its objects are not brighter than it)."""
        from scipy import ndimage

        if rng.random() >= self.share or not mask.any() or mask.all() or not math.isfinite(size):
            return image
        values = image.astype(np.float32)
        brightness = values.mean(-1)
        contrast = float(brightness[mask].mean() - np.median(brightness[~mask]))
        if contrast <= 0:
            return image
        falloff = np.exp(-ndimage.distance_transform_edt(~mask) / (rng.uniform(*self.reach) * max(size, 1.0)))
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma=max(1.0, size / 2))
        field = np.clip(1.0 + 0.5 * field / (field.std() + 1e-6), 0.0, None)
        glow = rng.uniform(*self.strength) * contrast * falloff * field  # over the objects too: no dark rim
        return np.clip(values + glow[..., None], 0, 255).round().astype(np.uint8)


def _blur(values: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = values.shape[0]
    out = F.conv2d(F.pad(values[None], (radius, radius, 0, 0), mode="replicate"),
                   kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"),
                   kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return out[0]


def padding_colour(image_processor) -> tuple[int, int, int]:
    """The uint8 colour that ``image_processor``'s rescale and normalisation map to (about) 0: what its zero
    padding after normalisation stands for."""
    rescale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
    mean = image_processor.image_mean if image_processor.do_normalize else (0.0, 0.0, 0.0)
    return tuple(int(np.clip(round(m / rescale), 0, 255)) for m in mean)


class ScaleAugmentation:
    """Training views of native-resolution images: a zoom crop for the domains in ``zoom`` (the others keep the
    whole image with random flips), then ``photometric`` changes if given. ``size``: the model input side;
    ``fill``: the colour of the canvas around an image smaller than a view (:func:`padding_colour`); ``halo``: a
    :class:`Halo` around the objects of the object-size domains' views, before the photometric changes."""

    def __init__(self, zoom: Mapping[str, ZoomRange], size: int, photometric: Photometric | None = None,
                 fill: tuple[int, int, int] = (0, 0, 0), halo: Halo | None = None):
        self.zoom, self.size, self.photometric, self.fill = dict(zoom), size, photometric, tuple(fill)
        self.halo = halo
        self._sizes: dict[tuple[str, int], float] = {}

    def reference_size(self, domain: str, key: int, mask: np.ndarray) -> float:
        """The object size of a mask (cached by ``key``), or a scale's reference (1) for ``scale`` zooms."""
        if self.zoom[domain].kind != "object_size":
            return 1.0
        if (domain, key) not in self._sizes:
            self._sizes[(domain, key)] = object_size(mask)
        return self._sizes[(domain, key)]

    def __call__(self, image: np.ndarray, mask: np.ndarray, domain: str, key: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if domain in self.zoom:
            reference = self.reference_size(domain, key, mask)
            if math.isfinite(reference):
                scale = self.zoom[domain].draw_scale(rng, reference)
            else:  # no object to size: the whole image
                scale = self.size / max(mask.shape)
            partial = self.zoom[domain].kind == "object_size" and rng.random() < PARTIAL_VIEW_SHARE
            field = tuple(rng.uniform(*PARTIAL_VIEW_SIDES, size=2)) if partial else (1.0, 1.0)
            image, mask = zoom_crop(image, mask, scale, self.size, rng, fill=self.fill, field=field)
            if self.halo is not None and self.zoom[domain].kind == "object_size":
                image = self.halo(image, mask, reference * scale, rng)
        else:
            if rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
        if self.photometric is not None:
            image = self.photometric(image, rng)
        return image, mask


def training_augmentation(config, image_processor=None, photometric: bool = True) -> ScaleAugmentation | None:
    """The scale augmentation a training configuration asks for (``zoom``, and ``photometric`` unless
    ``photometric=False``), or None; the canvas takes ``image_processor``'s padding colour (black without one)."""
    photometric = photometric and config.photometric
    if not config.zoom and not photometric:
        return None
    fill = padding_colour(image_processor) if image_processor is not None else (0, 0, 0)
    return ScaleAugmentation(parse_zoom(config.zoom), config.image_size, Photometric() if photometric else None,
                             fill, Halo() if photometric else None)
