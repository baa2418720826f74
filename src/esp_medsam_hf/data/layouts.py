"""Input layouts: where the image and the mask file(s) of each official file name lie in a folder on disk.

Three kinds of layout are accepted:

* ``plain`` (:data:`PLAIN`), for any domain, a user's own included: an ``images/`` folder and a ``masks/`` folder
  with matching names, or a CSV/JSON listing of image and mask paths with an optional split per pair;

* ``official``: the official release's preprocessed folders, ``image_1024/NAME.png`` and ``mask_1024/NAME.png``
  (in the given folder or in its ``<domain>/`` subfolder), for every domain.
* the public dataset's own layout, as distributed, wherever the official file names can be derived from it
  (see :data:`LAYOUTS`). Masks that come as several files (one per nucleus in DSB 2018, ``_mask_1`` ... in BUSI,
  left and right lung in Montgomery) are merged with a logical OR.

Each layout only maps names to paths; reading and checking the files is :mod:`esp_medsam_hf.data.prepare`'s.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..models.esp_medsam.image_reading import IMAGE_SUFFIXES
from .domains import DOMAIN_NAMES, get_domain


class LayoutError(ValueError):
    """The folder does not hold a layout this package can read."""


@dataclass(frozen=True)
class SourceItem:
    """The files of one file name: an image and the mask files to merge (none if no mask was found), and the split
    the layout assigns (None: the official lists, or a seeded split, decide)."""

    name: str
    image: Path
    masks: tuple[Path, ...]
    split: str | None = None


KeyFunction = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class Layout:
    """A named way of finding images and masks under a folder."""

    name: str
    description: str
    finder: Callable[[Path, str], dict[str, SourceItem]]

    def find(self, root: Path, domain: str) -> dict[str, SourceItem]:
        """Official file name -> files, for everything this layout recognises under ``root``."""
        return self.finder(Path(root), domain)


def _list_files(root: Path, within: Path | None = None) -> list[Path]:
    """The files under ``root`` (hidden ones left out); a symlink leading outside ``within`` (default: ``root``),
    the input folder, is refused."""
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files.extend(Path(folder) / name for name in sorted(names) if not name.startswith("."))
    for path in files:
        _check_inside(path, within or root)
    return files


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a symlink that leads outside the input folder ``root`` (to ``/dev/zero``, another user's files...)."""
    if path.is_symlink() and root.resolve() not in path.resolve().parents:
        raise LayoutError(f"{path} is a symlink to {path.resolve()}, outside the input folder {root}; copy the file "
                          "into the folder instead")


def _assemble(files: list[Path], image_key: KeyFunction, mask_key: KeyFunction) -> dict[str, SourceItem]:
    """Pair images and masks by official name: ``mask_key``/``image_key`` give the name of a file, or None."""
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        key = mask_key(path)
        if key is not None:
            masks[key].append(path)
            continue
        key = image_key(path)
        if key is None:
            continue
        if key in images:
            raise LayoutError(f"two images give the official name {key}: {images[key]} and {path}")
        images[key] = path
    return {key: SourceItem(key, path, tuple(sorted(masks.get(key, ())))) for key, path in sorted(images.items())}


def _match(pattern: str, flags: int = 0) -> Callable[[str], "re.Match[str] | None"]:
    compiled = re.compile(pattern, flags)
    return compiled.fullmatch


def _find_official(root: Path, domain: str) -> dict[str, SourceItem]:
    for base in (root, root / domain):
        image_dir, mask_dir = base / "image_1024", base / "mask_1024"
        if image_dir.is_dir():
            break
    else:
        return {}
    items: dict[str, SourceItem] = {}
    for image in sorted(image_dir.iterdir()):
        if image.suffix.lower() not in IMAGE_SUFFIXES or image.name.startswith("."):
            continue
        mask = mask_dir / image.name
        items[image.name] = SourceItem(image.name, image, (mask,) if mask.is_file() else ())
    return items


def _regex_layout(image_pattern: str, mask_pattern: str, name: Callable[[re.Match[str]], str]):
    """A finder for layouts where the file names alone tell images from masks."""
    image_match, mask_match = _match(image_pattern, re.I), _match(mask_pattern, re.I)

    def finder(root: Path, domain: str) -> dict[str, SourceItem]:
        def key(match_function):
            def inner(path: Path) -> str | None:
                found = match_function(path.name)
                return name(found) if found else None

            return inner

        return _assemble(_list_files(root), key(image_match), key(mask_match))

    return finder


def _find_lung(root: Path, domain: str) -> dict[str, SourceItem]:
    # Shenzhen: CXR_png/CHNCXR_0001_0.png + masks/CHNCXR_0001_0_mask.png; Montgomery: CXR_png/MCUCXR_0001_0.png +
    # ManualMask/leftMask/MCUCXR_0001_0.png + ManualMask/rightMask/MCUCXR_0001_0.png (same name: the folder tells).
    shenzhen_image = _match(r"(CHNCXR_\d{4}_[01])\.png", re.I)
    shenzhen_mask = _match(r"(CHNCXR_\d{4}_[01])_mask\.png", re.I)
    montgomery = _match(r"(MCUCXR_\d{4}_[01])\.png", re.I)

    def mask_key(path: Path) -> str | None:
        if found := shenzhen_mask(path.name):
            return found[1] + ".png"
        if (found := montgomery(path.name)) and path.parent.name.lower() in ("leftmask", "rightmask"):
            return found[1] + ".png"
        return None

    def image_key(path: Path) -> str | None:
        found = shenzhen_image(path.name) or montgomery(path.name)
        return found[1] + ".png" if found else None

    return _assemble(_list_files(root), image_key, mask_key)


def _find_drive(root: Path, domain: str) -> dict[str, SourceItem]:
    # DRIVE: {training,test}/images/21_training.tif + {training,test}/1st_manual/21_manual1.gif; images 01-20 are
    # the test set, 21-40 the training set, so the manual's number alone gives the official name.
    image_match = _match(r"(\d{2})_(training|test)\.(tif|tiff|png|gif)", re.I)
    mask_match = _match(r"(\d{2})_manual1\.(gif|png|tif|tiff)", re.I)

    def image_key(path: Path) -> str | None:
        found = image_match(path.name)
        return f"{found[1]}_{found[2].lower()}.png" if found else None

    def mask_key(path: Path) -> str | None:
        found = mask_match(path.name)
        if not found:
            return None
        return f"{found[1]}_{'training' if int(found[1]) > 20 else 'test'}.png"

    return _assemble(_list_files(root), image_key, mask_key)


def _find_dsb(root: Path, domain: str) -> dict[str, SourceItem]:
    # DSB 2018: stage1_train/<id>/images/<id>.png + stage1_train/<id>/masks/<one file per nucleus>.png
    hex_id = _match(r"[0-9a-f]{64}")

    def image_key(path: Path) -> str | None:
        sample = path.parent.parent.name
        if path.parent.name == "images" and hex_id(sample) and path.stem == sample:
            return sample + ".png"
        return None

    def mask_key(path: Path) -> str | None:
        sample = path.parent.parent.name
        if path.parent.name == "masks" and hex_id(sample) and path.suffix.lower() in IMAGE_SUFFIXES:
            return sample + ".png"
        return None

    return _assemble(_list_files(root), image_key, mask_key)


def _find_tnbc(root: Path, domain: str) -> dict[str, SourceItem]:
    # TNBC: Slide_01/01_1.png + GT_01/01_1.png -> TNBC_01_1.png
    file_match = _match(r"(\d{2})_(\d+)\.png", re.I)

    def key(folder_pattern: str) -> KeyFunction:
        folder_match = _match(folder_pattern, re.I)

        def inner(path: Path) -> str | None:
            folder, found = folder_match(path.parent.name), file_match(path.name)
            return f"TNBC_{found[1]}_{found[2]}.png" if folder and found and folder[1] == found[1] else None

        return inner

    return _assemble(_list_files(root), key(r"Slide_(\d{2})"), key(r"GT_(\d{2})"))


def _paired_folders(image_folders: tuple[str, ...], mask_folders: tuple[str, ...], name: Callable[[str], str]):
    """A finder for ``<image folder>/N.ext`` + ``<mask folder>/N.ext`` layouts with numbered files."""
    number = _match(r"p?(\d+)\.(png|tif|tiff|bmp|jpg|jpeg)", re.I)

    def key(folders: tuple[str, ...]) -> KeyFunction:
        def inner(path: Path) -> str | None:
            found = number(path.name)
            if found and path.parent.name.lower() in folders:
                return name(str(int(found[1])))
            return None

        return inner

    def finder(root: Path, domain: str) -> dict[str, SourceItem]:
        return _assemble(_list_files(root), key(image_folders), key(mask_folders))

    return finder


OFFICIAL = Layout(
    "official", "the official preprocessed folders: image_1024/NAME.png + mask_1024/NAME.png", _find_official
)

LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "isic": (
        OFFICIAL,
        Layout(
            "isic2018",
            "ISIC 2018 task 1 as distributed: ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_NNNNNNN.jpg + "
            "ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_NNNNNNN_segmentation.png",
            _regex_layout(r"(ISIC_\d{7})\.(jpg|jpeg|png)", r"(ISIC_\d{7})_segmentation\.png", lambda m: m[1] + ".png"),
        ),
    ),
    "ph2": (
        OFFICIAL,
        Layout(
            "ph2",
            "PH2 as distributed: PH2 Dataset images/IMDNNN/IMDNNN_Dermoscopic_Image/IMDNNN.bmp + "
            "IMDNNN/IMDNNN_lesion/IMDNNN_lesion.bmp",
            _regex_layout(r"(IMD\d{3})\.bmp", r"(IMD\d{3})_lesion\.bmp", lambda m: m[1] + ".png"),
        ),
    ),
    "lung": (
        OFFICIAL,
        Layout(
            "shenzhen-montgomery",
            "Shenzhen CXR_png/CHNCXR_NNNN_D.png + masks/CHNCXR_NNNN_D_mask.png, and Montgomery "
            "CXR_png/MCUCXR_NNNN_D.png + ManualMask/leftMask/ and ManualMask/rightMask/ (merged), in any sub-folders",
            _find_lung,
        ),
    ),
    "nih": (OFFICIAL,),
    "ultrasound": (OFFICIAL,),
    "busi": (
        OFFICIAL,
        Layout(
            "busi",
            "Dataset_BUSI_with_GT/{benign,malignant,normal}/'benign (N).png' + 'benign (N)_mask.png', "
            "'benign (N)_mask_1.png', ... (merged)",
            _regex_layout(
                r"((?:benign|malignant|normal) \(\d+\))\.png",
                r"((?:benign|malignant|normal) \(\d+\))_mask(?:_\d+)?\.png",
                lambda m: m[1] + ".png",
            ),
        ),
    ),
    "retinal": (
        OFFICIAL,
        Layout(
            "drive",
            "DRIVE: {training,test}/images/NN_{training,test}.tif + {training,test}/1st_manual/NN_manual1.gif",
            _find_drive,
        ),
    ),
    "stare": (
        OFFICIAL,
        Layout(
            "stare",
            "STARE: imNNNN.ppm (or .ppm.gz, as distributed) + Hoover's labels imNNNN.ah.ppm (or .ah.ppm.gz)",
            _regex_layout(r"(im\d{4})\.ppm(?:\.gz)?", r"(im\d{4})\.ah\.ppm(?:\.gz)?", lambda m: m[1] + ".png"),
        ),
    ),
    "dsb": (
        OFFICIAL,
        Layout(
            "dsb2018",
            "DSB 2018 stage1_train/<id>/images/<id>.png + stage1_train/<id>/masks/*.png (one per nucleus, merged)",
            _find_dsb,
        ),
    ),
    "tnbc": (
        OFFICIAL,
        Layout("tnbc", "TNBC_NucleiSegmentation/Slide_XX/XX_N.png + GT_XX/XX_N.png", _find_tnbc),
    ),
    "cvccdb": (
        OFFICIAL,
        Layout(
            "cvc-clinicdb",
            "CVC-ClinicDB: Original/N.tif + 'Ground Truth'/N.tif (or PNG/Original + PNG/'Ground Truth', or "
            "images/N.png + masks/N.png)",
            _paired_folders(("original", "images"), ("ground truth", "groundtruth", "masks"), lambda n: f"{n}.png"),
        ),
    ),
    "colon": (
        OFFICIAL,
        Layout(
            "cvc-colondb",
            "CVC-ColonDB as in the polyp benchmarks: images/N.png + masks/N.png (or Original/ + 'Ground Truth'/)",
            _paired_folders(
                ("images", "original"), ("masks", "ground truth", "groundtruth"), lambda n: f"colondb_{n}.png"
            ),
        ),
    ),
}
assert tuple(LAYOUTS) == DOMAIN_NAMES

SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "test": "test", "testing": "test"}
"""Split names a listing or a sub-folder may use, and the ``datasets`` split each stands for."""
MASK_NAME_SUFFIXES = ("", "_mask", "-mask", "_masks", "_seg", "_segmentation", "_label", "_labels", "_gt")
"""What a mask's file stem may add to its image's stem in the plain layout (``case1.png`` -> ``case1_mask.png``)."""


def _split_name(value: str, where: str) -> str | None:
    value = (value or "").strip().lower()
    if not value:
        return None
    if value not in SPLIT_ALIASES:
        raise LayoutError(f"{where}: unknown split {value!r}; expected one of {', '.join(sorted(SPLIT_ALIASES))}")
    return SPLIT_ALIASES[value]


def _read_listing(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV (header ``image,mask[,split]``) or JSON (a list of such objects, or ``{"pairs": [...]}``)."""
    if path.suffix.lower() == ".json":
        import json

        data = json.loads(path.read_text())
        rows = data.get("pairs") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise LayoutError(f"{path}: expected a list of {{\"image\", \"mask\", \"split\"}} objects")
        return rows
    import csv

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"image", "mask"} <= set(rows[0]):
        raise LayoutError(f"{path}: the CSV header must name the columns image and mask (and optionally split), "
                          f"got {', '.join(rows[0])}")
    return rows


def _find_listing(path: Path) -> dict[str, SourceItem]:
    items: dict[str, SourceItem] = {}
    for number, row in enumerate(_read_listing(path), start=1):
        where = f"{path}, entry {number}"
        if not row.get("image") or not row.get("mask"):
            raise LayoutError(f"{where}: an image and a mask path are required")
        image, mask = (path.parent / row["image"]), (path.parent / row["mask"])
        for label, file in (("image", image), ("mask", mask)):
            if not file.is_file():
                raise LayoutError(f"{where}: {label} file {file} does not exist")
        name = row.get("name") or image.name
        if name in items:
            raise LayoutError(f"{where}: the name {name} is listed twice (give a distinct 'name' column)")
        items[name] = SourceItem(name, image, (mask,), _split_name(row.get("split", ""), where))
    return items


def _find_plain(root: Path, domain: str) -> dict[str, SourceItem]:
    """``root`` a CSV/JSON listing, or a folder with ``images/`` and ``masks/`` (optionally with split sub-folders
    ``train/``, ``validation/``, ``test/`` inside both): images and masks paired by file stem."""
    if root.is_file():
        return _find_listing(root)
    image_root, mask_root = root / "images", root / "masks"
    if not image_root.is_dir() or not mask_root.is_dir():
        raise LayoutError(f"{root}: the plain layout needs images/ and masks/ folders (or a CSV/JSON listing file)")
    masks: dict[tuple[str, str], Path] = {}
    for path in _list_files(mask_root, root):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            relative = path.relative_to(mask_root)
            masks[(str(relative.parent), path.stem)] = path
    items: dict[str, SourceItem] = {}
    for path in _list_files(image_root, root):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = path.relative_to(image_root)
        folder, top = str(relative.parent), relative.parts[0].lower()
        split = SPLIT_ALIASES[top] if len(relative.parts) > 1 and top in SPLIT_ALIASES else None
        found = [masks[key] for suffix in MASK_NAME_SUFFIXES if (key := (folder, path.stem + suffix)) in masks]
        name = str(relative.with_suffix(".png")).replace(os.sep, "/")
        if name in items:
            raise LayoutError(f"two images give the name {name}: {items[name].image} and {path}")
        items[name] = SourceItem(name, path, tuple(found[:1]), split)
    return items


PLAIN = Layout(
    "plain",
    "images/NAME.ext + masks/NAME[_mask].ext (optionally inside train/, validation/, test/), or a CSV/JSON listing "
    "of image,mask[,split] paths relative to the listing",
    _find_plain,
)


def get_layout(domain: str, name: str) -> Layout:
    """The layout ``name`` of ``domain``; raises ``LayoutError`` listing the accepted ones otherwise."""
    if name == PLAIN.name:
        return PLAIN
    if domain not in LAYOUTS:
        raise LayoutError(f"domain {domain!r} is not an official domain: its data comes in the plain layout")
    for layout in LAYOUTS[domain]:
        if layout.name == name:
            return layout
    accepted = ", ".join(layout.name for layout in LAYOUTS[domain] + (PLAIN,))
    raise LayoutError(f"layout {name!r} is not accepted for domain {domain!r}; accepted: {accepted}")


def detect_layout(root: Path, domain: str) -> tuple[Layout, dict[str, SourceItem]]:
    """The accepted layout of ``domain`` that finds the most official names under ``root``, and what it found.
    Domains other than the official 12 take the plain layout."""
    if domain not in LAYOUTS:
        return PLAIN, PLAIN.find(root, domain)
    official_names = get_domain(domain).all_file_names()
    best: tuple[int, Layout, dict[str, SourceItem]] | None = None
    problems: list[str] = []
    for layout in LAYOUTS[domain]:
        try:
            items = layout.find(root, domain)
        except LayoutError as error:  # e.g. official folders also match a native layout's file names twice
            if not Path(root).is_dir():
                raise
            problems.append(f"{layout.name}: {error}")
            continue
        score = sum(name in official_names for name in items)
        if items and (best is None or score > best[0]):
            best = (score, layout, items)
    if best is None:
        accepted = "; ".join(f"{layout.name}: {layout.description}" for layout in LAYOUTS[domain])
        found = f"; {'; '.join(problems)}" if problems else ""
        raise LayoutError(f"{root}: no image of domain {domain!r} found in any accepted layout ({accepted}){found}")
    return best[1], best[2]

