"""Small replicas of every accepted input layout, for the data preparation tests."""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from esp_medsam_hf.data.domains import get_domain

HEIGHT, WIDTH = 20, 24


def pick_names(domain: str, per_split: int = 1, extra: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """The first ``per_split`` official names of each split, plus the first name matching ``extra`` if given."""
    chosen = {split: names[:per_split] for split, names in get_domain(domain).splits().items()}
    if extra is not None:
        for split, names in get_domain(domain).splits().items():
            match = next((name for name in names if extra(name)), None)
            if match is not None:
                if match not in chosen[split]:
                    chosen[split].append(match)
                break
    return chosen


def random_image(rng: np.random.Generator, grey: bool = False) -> np.ndarray:
    shape = (HEIGHT, WIDTH) if grey else (HEIGHT, WIDTH, 3)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def random_parts(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """``count`` disjoint-ish rectangles as bool masks (their union is the expected merged mask)."""
    parts = []
    for index in range(count):
        mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
        y = int(rng.integers(0, HEIGHT - 4))
        x = int(rng.integers(0, WIDTH - 4))
        mask[y : y + 3 + index, x : x + 4] = True
        parts.append(mask)
    return parts


def save(array: np.ndarray, path: Path, format: str | None = None, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format or _format(path))
    data = buffer.getvalue()
    path.write_bytes(gzip.compress(data) if gz else data)


def _format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpg": "JPEG", "tif": "TIFF", "ppm": "PPM", "bmp": "BMP", "gif": "GIF"}.get(suffix, "PNG")


def as255(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 255, 0).astype(np.uint8)


def _stem(name: str) -> str:
    return name[: -len(".png")]


def write_official(root: Path, name: str, image, parts) -> None:
    save(image, root / "image_1024" / name)
    save(as255(np.logical_or.reduce(parts)), root / "mask_1024" / name)


def write_isic(root: Path, name: str, image, parts) -> None:
    stem = _stem(name)
    save(image, root / "ISIC2018_Task1-2_Training_Input" / f"{stem}.jpg")
    save(as255(parts[0]), root / "ISIC2018_Task1_Training_GroundTruth" / f"{stem}_segmentation.png")
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("licence")


def write_ph2(root: Path, name: str, image, parts) -> None:
    stem = _stem(name)
    case = root / "PH2Dataset" / "PH2 Dataset images" / stem
    save(image, case / f"{stem}_Dermoscopic_Image" / f"{stem}.bmp")
    save(as255(parts[0]), case / f"{stem}_lesion" / f"{stem}_lesion.bmp")
    save(as255(parts[0]), case / f"{stem}_roi" / f"{stem}_R1_Label4.bmp")


def write_lung(root: Path, name: str, image, parts) -> None:
    stem = _stem(name)
    if stem.startswith("CHNCXR"):
        save(image, root / "ChinaSet_AllFiles" / "CXR_png" / name)
        save(as255(np.logical_or.reduce(parts)), root / "ChinaSet_AllFiles" / "masks" / f"{stem}_mask.png")
    else:
        save(image, root / "MontgomerySet" / "CXR_png" / name)
        save(as255(parts[0]), root / "MontgomerySet" / "ManualMask" / "leftMask" / name)
        save(as255(parts[1]), root / "MontgomerySet" / "ManualMask" / "rightMask" / name)


def write_busi(root: Path, name: str, image, parts) -> None:
    stem = _stem(name)
    folder = root / "Dataset_BUSI_with_GT" / stem.split(" ")[0]
    save(image, folder / name)
    save(as255(parts[0]), folder / f"{stem}_mask.png")
    for index, part in enumerate(parts[1:], start=1):
        save(as255(part), folder / f"{stem}_mask_{index}.png")


def write_drive(root: Path, name: str, image, parts) -> None:
    number, subset = re.fullmatch(r"(\d{2})_(training|test)\.png", name).groups()
    folder = root / "DRIVE" / subset
    save(image, folder / "images" / f"{number}_{subset}.tif")
    save(as255(parts[0]), folder / "1st_manual" / f"{number}_manual1.gif")
    save(as255(~parts[0]), folder / "mask" / f"{number}_{subset}_mask.gif")


def write_stare(root: Path, name: str, image, parts) -> None:
    stem = _stem(name)
    save(image, root / "stare-images" / f"{stem}.ppm.gz", format="PPM", gz=True)
    labels = np.repeat(as255(parts[0])[..., None], 3, axis=-1)
    save(labels, root / "labels-ah" / f"{stem}.ah.ppm.gz", format="PPM", gz=True)
    save(as255(~parts[0]), root / "labels-vk" / f"{stem}.vk.ppm.gz", format="PPM", gz=True)


def write_dsb(root: Path, name: str, image, parts) -> None:
    sample = _stem(name)
    folder = root / "stage1_train" / sample
    rgba = np.concatenate([image, np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
    save(rgba, folder / "images" / name)
    for index, part in enumerate(parts):
        save(as255(part), folder / "masks" / f"{index:064x}.png")


def write_tnbc(root: Path, name: str, image, parts) -> None:
    _, slide, number = _stem(name).split("_")
    base = root / "TNBC_NucleiSegmentation"
    save(image, base / f"Slide_{slide}" / f"{slide}_{number}.png")
    save(as255(parts[0]), base / f"GT_{slide}" / f"{slide}_{number}.png")


def write_cvccdb(root: Path, name: str, image, parts) -> None:
    save(image, root / "CVC-ClinicDB" / "Original" / f"{_stem(name)}.tif")
    save(as255(parts[0]), root / "CVC-ClinicDB" / "Ground Truth" / f"{_stem(name)}.tif")


def write_colon(root: Path, name: str, image, parts) -> None:
    number = _stem(name).split("_")[1]
    save(image, root / "CVC-ColonDB" / "images" / f"{number}.png")
    save(as255(parts[0]), root / "CVC-ColonDB" / "masks" / f"{number}.png")


# layout name -> (domain, writer, number of mask parts, grey images, a name that must not be listed, extra name)
NATIVE_LAYOUTS: dict[str, tuple] = {
    "isic2018": ("isic", write_isic, 1, False, "ISIC_9999999.png", None),
    "ph2": ("ph2", write_ph2, 1, False, "IMD999.png", None),
    "shenzhen-montgomery": ("lung", write_lung, 2, True, "CHNCXR_9999_0.png", lambda n: n.startswith("MCUCXR")),
    "busi": ("busi", write_busi, 3, True, "benign (9999).png", None),
    "drive": ("retinal", write_drive, 1, False, None, None),
    "stare": ("stare", write_stare, 1, False, "im9999.png", None),
    "dsb2018": ("dsb", write_dsb, 3, False, "f" * 64 + ".png", None),
    "tnbc": ("tnbc", write_tnbc, 1, False, "TNBC_99_1.png", None),
    "cvc-clinicdb": ("cvccdb", write_cvccdb, 1, False, "9999.png", None),
    "cvc-colondb": ("colon", write_colon, 1, False, "colondb_9999.png", None),
}


def build_replica(root: Path, layout: str, domain: str | None = None, seed: int = 0):
    """Write a small replica; returns (names per split, expected mask per official name, unlisted names)."""
    rng = np.random.default_rng(seed)
    if layout == "official":
        writer, parts_count, grey, unlisted, extra = write_official, 1, False, "unlisted_case.png", None
    else:
        domain, writer, parts_count, grey, unlisted, extra = NATIVE_LAYOUTS[layout]
    names = pick_names(domain, extra=extra)
    expected: dict[str, np.ndarray] = {}
    for name in [n for split_names in names.values() for n in split_names] + ([unlisted] if unlisted else []):
        parts = random_parts(rng, parts_count)
        writer(root, name, random_image(rng, grey), parts)
        expected[name] = np.logical_or.reduce(parts)
    return names, expected, [unlisted] if unlisted else []


def run_command(module, argv: list[str]) -> int:
    """Run one ``esp-medsam`` command module with ``argv`` (without needing the other commands to exist)."""
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
