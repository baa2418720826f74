"""SYNTHETIC stand-ins for the 12 domains, in the package's dataset schema (numpy only, deterministic by seed).

Each modality has its own look and target: a pigmented skin lesion on skin (dermoscopy), two lung fields in a
chest radiograph (x-ray), a dark mass in speckled tissue (ultrasound), a branching vessel tree on a fundus disc
(fundus), many small nuclei (microscopy) and a polyp on mucosa (colonoscopy). The unseen domain of a modality
differs from its source domain the way a real domain shift does (colour, contrast, noise, scale), e.g.
fluorescence nuclei (dsb) versus H&E-like histology (tnbc). Every image is drawn from its own generator seeded by
``(seed, domain, split, index)``, so any subset is reproducible. File names are ``synthetic_<domain>_<split>_<i>``.
These are not real images: say "synthetic" wherever results on them are shown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .domains import DOMAIN_NAMES, SPLIT_NAMES, get_domain
from .schema import describe, encode_mask, encode_png, features

DEFAULT_SIZE = 128
SPLITS = tuple(SPLIT_NAMES.values())


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random lattice bilinearly interpolated to size x size."""
    lattice = rng.random((cells + 1, cells + 1)).astype(np.float32)
    position = np.linspace(0, cells, size, dtype=np.float32)
    low = np.minimum(position.astype(int), cells - 1)
    frac = position - low
    rows = lattice[low] * (1 - frac)[:, None] + lattice[low + 1] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]


def _blob(yy, xx, cy, cx, radius, rng, wobble=0.25, harmonics=4, aspect=1.0, angle=0.0) -> np.ndarray:
    """Signed radial coordinate of an irregular blob: < 1 inside, with a boundary wobbling in angle."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / aspect, -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    modulation = np.ones_like(theta)
    for k in range(2, 2 + harmonics):
        modulation += wobble / k * rng.uniform(0.3, 1.0) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) / (radius * modulation)


def _segment_distance(yy, xx, y0, x0, y1, x1) -> np.ndarray:
    vy, vx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * vy + (xx - x0) * vx) / max(vy * vy + vx * vx, 1e-12), 0, 1)
    return np.hypot(yy - (y0 + t * vy), xx - (x0 + t * vx))


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)


def _dermoscopy(rng, size, unseen):
    yy, xx = _grid(size)
    skin = np.array([0.85, 0.68, 0.6] if not unseen else [0.93, 0.8, 0.76], dtype=np.float32)
    texture = _smooth_noise(rng, size, 8)[..., None] * 0.12 - 0.06
    image = skin + texture + rng.normal(0, 0.015, (size, size, 1)).astype(np.float32)
    radius = rng.uniform(0.18, 0.3) * (1.25 if unseen else 1.0)
    r = _blob(yy, xx, rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), radius, rng, wobble=0.35)
    mask = r < 1
    lesion = np.array([0.42, 0.26, 0.18] if not unseen else [0.3, 0.18, 0.14], dtype=np.float32)
    core = np.clip(1 - r, 0, 1)[..., None]
    blotches = _smooth_noise(rng, size, 12)[..., None] * 0.2
    colour = lesion * (1.1 - 0.5 * core) + blotches * 0.3
    edge = np.clip((1.15 - r) / 0.3, 0, 1)[..., None]
    image = image * (1 - edge) + colour * edge
    for _ in range(rng.integers(3, 7)):
        y0, x0, a = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, np.pi)
        hair = _segment_distance(yy, xx, y0, x0, y0 + 0.6 * np.sin(a), x0 + 0.6 * np.cos(a)) < 0.004
        image[hair] *= 0.4
    if unseen:  # PH2-like dark vignette around a circular field of view
        image *= np.clip(1.6 - 1.4 * np.hypot(yy - 0.5, xx - 0.5) / 0.5, 0.05, 1)[..., None]
    return image, mask


def _xray(rng, size, unseen):
    yy, xx = _grid(size)
    body = np.clip(1 - ((xx - 0.5) / 0.47) ** 6, 0, 1) * 0.55 + 0.1
    image = body + _smooth_noise(rng, size, 6) * 0.08
    mask = np.zeros((size, size), dtype=bool)
    scale = rng.uniform(0.9, 1.05) * (0.88 if unseen else 1.0)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.19, 0.22) * scale
        r = _blob(yy, xx, 0.48, cx, 0.14 * scale, rng, wobble=0.12, harmonics=3, aspect=2.1, angle=np.pi / 2)
        lung = r < 1
        mask |= lung
        image = image - 0.32 * np.clip((1.15 - r) / 0.25, 0, 1)
    ribs = 0.05 * (np.sin(yy * 2 * np.pi * 7 + np.abs(xx - 0.5) * 9) > 0.6)
    spine = 0.25 * np.exp(-(((xx - 0.5) / 0.04) ** 2)) * (yy > 0.15)
    image = image + ribs * (mask | (np.abs(xx - 0.5) > 0.1)) + spine
    if unseen:  # NIH-like: flatter contrast, brighter, noisier
        image = 0.25 + 0.6 * image
    image = image + rng.normal(0, 0.04 if unseen else 0.02, image.shape)
    return np.repeat(image[..., None], 3, axis=-1), mask


def _ultrasound(rng, size, unseen):
    yy, xx = _grid(size)
    layers = 0.45 + 0.15 * np.sin(yy * 2 * np.pi * rng.uniform(2, 4) + _smooth_noise(rng, size, 4) * 3)
    radius = rng.uniform(0.1, 0.17) * (1.3 if unseen else 1.0)
    cy, cx = rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.65)
    r = _blob(yy, xx, cy, cx, radius, rng, wobble=0.3, aspect=rng.uniform(1.2, 1.7))
    mask = r < 1
    echo = layers * np.where(mask, 0.18, 1.0)
    shadow = np.exp(-(((xx - cx) / radius) ** 2)) * (yy > cy) * 0.25
    echo = echo + shadow * (0.6 if unseen else -0.6) * echo
    cells = size // (4 if unseen else 2)
    speckle = rng.rayleigh(1.0, (cells, cells)).astype(np.float32)
    speckle = np.kron(speckle, np.ones((size // cells, size // cells), dtype=np.float32))[:size, :size]
    image = echo * speckle * 0.8 * np.clip(1.2 - yy * 0.6, 0, 1)
    if unseen:  # BUSI-like: higher gain, lower contrast, text band on top
        image = 0.15 + 0.8 * image
        image[: size // 16] = 0.05
    return np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1), mask


def _fundus(rng, size, unseen):
    yy, xx = _grid(size)
    fov = np.hypot(yy - 0.5, xx - 0.5) < 0.46
    base = np.array([0.78, 0.32, 0.12] if not unseen else [0.85, 0.55, 0.25], dtype=np.float32)
    shade = 1 - 0.6 * np.hypot(yy - 0.5, xx - 0.5)[..., None]
    image = base * shade * (0.9 + 0.2 * _smooth_noise(rng, size, 6))[..., None]
    side = rng.choice([-1, 1])
    dy, dx = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + side * rng.uniform(0.15, 0.22)
    disc = np.exp(-(np.hypot(yy - dy, xx - dx) / 0.06) ** 2)[..., None]
    image = image + disc * np.array([0.3, 0.4, 0.3], dtype=np.float32)
    mask = np.zeros((size, size), dtype=bool)
    thickness = (0.016 if not unseen else 0.012) * (128 / size) ** 0.2
    stack = [(dy, dx, angle, thickness, 0) for angle in (-np.pi / 2 - side * 0.9, np.pi / 2 + side * 0.9)]
    stack += [(dy, dx, angle, thickness * 0.8, 1) for angle in (-side * 0.2 + np.pi * (side > 0), np.pi)]
    while stack:
        y, x, angle, width, depth = stack.pop()
        length = rng.uniform(0.1, 0.18)
        for _ in range(3):
            angle += rng.normal(0, 0.25)
            y1, x1 = y + length / 3 * np.sin(angle), x + length / 3 * np.cos(angle)
            margin = width + 2 / size
            y_lo, y_hi = int(max(min(y, y1) - margin, 0) * size), int(min(max(y, y1) + margin, 1) * size) + 1
            x_lo, x_hi = int(max(min(x, x1) - margin, 0) * size), int(min(max(x, x1) + margin, 1) * size) + 1
            if y_hi > y_lo and x_hi > x_lo:
                window = _segment_distance(yy[y_lo:y_hi, x_lo:x_hi], xx[y_lo:y_hi, x_lo:x_hi], y, x, y1, x1)
                mask[y_lo:y_hi, x_lo:x_hi] |= window < max(width / 2, 0.75 / size)  # never thinner than 1.5 px
            y, x = y1, x1
        if depth < 4 and width > 0.004:
            for turn in (-1, 1):
                stack.append((y, x, angle + turn * rng.uniform(0.3, 0.7), width * 0.75, depth + 1))
    mask &= fov
    vessel = np.array([0.45, 0.1, 0.05] if not unseen else [0.62, 0.3, 0.15], dtype=np.float32)
    image = np.where(mask[..., None], vessel * shade, image)
    image = image + rng.normal(0, 0.03 if unseen else 0.015, image.shape)
    return np.where(fov[..., None], image, 0.02), mask


def _microscopy(rng, size, unseen):
    yy, xx = _grid(size)
    mask = np.zeros((size, size), dtype=bool)
    brightness = np.zeros((size, size), dtype=np.float32)
    count = rng.integers(18, 35) if not unseen else rng.integers(30, 55)
    radius = (0.035 if not unseen else 0.028) * rng.uniform(0.85, 1.15)
    for _ in range(count):
        cy, cx = rng.uniform(0.05, 0.95, 2)
        # each nucleus only touches a small window: compute it there (the whole image would be ~10x slower)
        half = radius * 2.5
        rows = slice(max(int((cy - half) * size), 0), min(int((cy + half) * size) + 1, size))
        cols = slice(max(int((cx - half) * size), 0), min(int((cx + half) * size) + 1, size))
        r = _blob(yy[rows, cols], xx[rows, cols], cy, cx, radius * rng.uniform(0.7, 1.3), rng, wobble=0.15,
                  harmonics=2, aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi))
        nucleus = r < 1
        mask[rows, cols] |= nucleus
        shade = np.where(nucleus, rng.uniform(0.5, 1.0) * (1.1 - 0.3 * r), 0)
        brightness[rows, cols] = np.maximum(brightness[rows, cols], shade)
    texture = _smooth_noise(rng, size, 24)
    if not unseen:  # fluorescence (DSB-like): bright nuclei on black
        grey = 0.03 + brightness * (0.8 + 0.2 * texture) + rng.normal(0, 0.02, (size, size))
        return np.repeat(grey[..., None], 3, axis=-1), mask
    # H&E-like histology (TNBC-like): purple nuclei on pink stroma
    stroma = np.array([0.92, 0.7, 0.82], dtype=np.float32) * (0.85 + 0.15 * texture)[..., None]
    nuclei = np.array([0.35, 0.2, 0.55], dtype=np.float32) * (0.8 + 0.3 * texture)[..., None]
    image = np.where(mask[..., None], nuclei, stroma) + rng.normal(0, 0.03, (size, size, 3))
    return image, mask


def _colonoscopy(rng, size, unseen):
    yy, xx = _grid(size)
    mucosa = np.array([0.8, 0.42, 0.35] if not unseen else [0.62, 0.38, 0.25], dtype=np.float32)
    folds = 0.15 * np.sin(np.hypot(yy - 0.45, xx - 0.55) * rng.uniform(18, 26) + _smooth_noise(rng, size, 5) * 4)
    vignette = np.clip(1.25 - 1.1 * np.hypot(yy - 0.5, xx - 0.5), 0.1, 1)
    image = mucosa * (vignette * (0.85 + folds))[..., None]
    radius = rng.uniform(0.12, 0.22) * (0.8 if unseen else 1.0)
    cy, cx = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    r = _blob(yy, xx, cy, cx, radius, rng, wobble=0.15, harmonics=3, aspect=rng.uniform(0.8, 1.25))
    mask = r < 1
    dome = np.sqrt(np.clip(1 - r**2, 0, 1))
    polyp = np.array([0.92, 0.6, 0.5] if not unseen else [0.75, 0.55, 0.35], dtype=np.float32)
    lit = polyp * (0.6 + 0.5 * dome + 0.15 * (yy - cy < 0))[..., None] * vignette[..., None]
    image = np.where(mask[..., None], lit, image)
    highlights = np.hypot(yy - cy + radius * 0.45, xx - cx) < 0.025
    for hy, hx in rng.uniform(0.1, 0.9, (int(rng.integers(3, 8)), 2)):
        highlights |= np.hypot((yy - hy) * 2.5, xx - hx) < rng.uniform(0.01, 0.025)
    image = np.where(highlights[..., None], 1.0, image)
    if unseen:  # ColonDB-like: darker, blurrier-looking, noisier
        image = 0.8 * image + rng.normal(0, 0.04, image.shape)
    else:
        image = image + rng.normal(0, 0.015, image.shape)
    return image, mask


_GENERATORS: dict[str, Callable] = {
    "dermoscopy": _dermoscopy,
    "x-ray": _xray,
    "ultrasound": _ultrasound,
    "fundus": _fundus,
    "microscopy": _microscopy,
    "colonoscopy": _colonoscopy,
}


def synthetic_example(
    domain: str, index: int, *, split: str = "train", seed: int = 0, size: int = DEFAULT_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (size x size x 3 uint8) and its mask (bool) of ``domain``; deterministic."""
    spec = get_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([seed, spec.index, SPLITS.index(split), index])
    image, mask = _GENERATORS[spec.modality](rng, size, not spec.is_source)
    return _to_uint8(np.asarray(image, dtype=np.float32)), np.asarray(mask, dtype=bool)


def _split_sizes(n_per_split: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(n_per_split, int):
        return dict.fromkeys(SPLITS, n_per_split)
    unknown = set(n_per_split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {', '.join(SPLITS)}")
    return {split: int(n) for split, n in n_per_split.items()}


def synthetic_domain(
    domain: str, n_per_split: int | Mapping[str, int] = 8, *, seed: int = 0, size: int = DEFAULT_SIZE
):
    """The DatasetDict of one synthetic domain (splits train/validation/test, or those given in a mapping)."""
    import datasets

    spec = get_domain(domain)
    splits = {}
    for split, count in _split_sizes(n_per_split).items():
        rows: dict[str, list] = {"image": [], "mask": [], "modality": [], "domain": [], "file_name": []}
        for index in range(count):
            image, mask = synthetic_example(domain, index, split=split, seed=seed, size=size)
            rows["image"].append(encode_png(image))
            rows["mask"].append(encode_mask(mask))
            rows["modality"].append(spec.modality_index)
            rows["domain"].append(spec.name)
            rows["file_name"].append(f"synthetic_{domain}_{split}_{index:04d}.png")
        splits[split] = datasets.Dataset.from_dict(rows, features=features(), split=datasets.Split(split))
    dataset_dict = datasets.DatasetDict(splits)
    describe(dataset_dict, spec, synthetic=True)
    return dataset_dict


def synthetic_domains(
    domains: list[str] | tuple[str, ...] | None = None,
    n_per_split: int | Mapping[str, int] = 8,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
) -> dict:
    """``{domain: DatasetDict}`` for the given domains (all 12 by default), ``n_per_split`` images per split."""
    return {name: synthetic_domain(name, n_per_split, seed=seed, size=size) for name in (domains or DOMAIN_NAMES)}
